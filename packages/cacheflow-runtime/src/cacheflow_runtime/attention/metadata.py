"""InputMetadata: how one step's flattened tokens map onto sequences and KV-cache slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputMetadata:
    """Describes a batch of sequences whose new tokens are flattened into one dimension.

    Sequence i contributes ``query_lens[i]`` new tokens (the whole prompt at a prefill step, one at
    a decode step; a prefix-cached or chunked prefill will contribute part of it) and attends to
    ``context_lens[i]`` tokens in total, the new ones being the last ``query_lens[i]`` of them.
    Every token's K/V is written to ``slot_mapping[t]`` (block_number * block_size + offset; -1
    means padding, not written) before attention reads the context through ``block_tables``.

    Tensors (all on the model's device):
      query_start_loc: int32 [num_seqs + 1], cumulative query lengths (cu_seqlens).
      context_lens:    int32 [num_seqs].
      block_tables:    int32 [num_seqs, max_num_blocks], padded with 0.
      slot_mapping:    int64 [num_tokens].
      logit_indices:   int64 [num_logit_rows], the token positions whose hidden states the
                       sampler needs (each sequence's last token, plus every prompt position when
                       prompt logprobs were asked for).
    """

    query_lens: list[int]
    context_lens_host: list[int]
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    logit_indices: torch.Tensor
    is_prompt: bool

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the batch."""
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        """Number of new (flattened) tokens in the batch."""
        return int(sum(self.query_lens))

    @property
    def max_query_len(self) -> int:
        """The longest run of new tokens of one sequence."""
        return max(self.query_lens, default=0)

    @property
    def max_context_len(self) -> int:
        """The longest context of one sequence."""
        return max(self.context_lens_host, default=0)
