"""InputMetadata: how one step's flattened tokens map onto sequences and KV-cache slots."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from cacheflow_runtime.attention.cascade import CascadePrefix, plan_cascade


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

    ``cascade``: for a decode step whose sequences share enough leading cache blocks, the shared
    blocks and each sequence's remaining ones (see cascade.py); None otherwise.

    ``prompt_lens``: each sequence's prompt length (0 for a sequence past its prompt), for
    rotary scaling that rotates a prompt by its length (dynamic NTK, LongRoPE); None where
    every sequence is taken as a prompt that ends at its context length.
    """

    query_lens: list[int]
    context_lens_host: list[int]
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    logit_indices: torch.Tensor
    is_prompt: bool
    cascade: CascadePrefix | None = None
    prompt_lens: list[int] | None = None

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

    @functools.cached_property
    def leading_decodes(self) -> Optional[LeadingDecodes]:
        """A mixed step cut in two for attention: the leading run of sequences with one new
        token each (the step's decodes come first), and every sequence after it.

        Returns None unless the step starts with at least one such sequence and has at least
        one sequence with more new tokens. The parts describe the same tensors' rows (the
        decodes' tokens are the first ``num_decodes`` rows); their ``query_start_loc`` counts
        from their own first row, and their ``slot_mapping`` / ``logit_indices`` are the
        slices of the step's own (attention reads neither). Worked out once per step (every
        layer asks).
        """
        return _split_leading_decodes(self)


@dataclass(frozen=True)
class LeadingDecodes:
    """See :attr:`InputMetadata.leading_decodes`."""

    num_decodes: int
    decodes: InputMetadata
    rest: InputMetadata


def _split_leading_decodes(metadata: InputMetadata) -> Optional[LeadingDecodes]:
    n = 0
    for q in metadata.query_lens:
        if q != 1:
            break
        n += 1
    if n == 0 or n == len(metadata.query_lens):
        return None
    decodes = InputMetadata(
        query_lens=metadata.query_lens[:n], context_lens_host=metadata.context_lens_host[:n],
        query_start_loc=metadata.query_start_loc[:n + 1],
        context_lens=metadata.context_lens[:n], block_tables=metadata.block_tables[:n],
        slot_mapping=metadata.slot_mapping[:n], logit_indices=metadata.logit_indices[:0],
        is_prompt=False, prompt_lens=_slice(metadata.prompt_lens, 0, n))
    rest = InputMetadata(
        query_lens=metadata.query_lens[n:], context_lens_host=metadata.context_lens_host[n:],
        query_start_loc=metadata.query_start_loc[n:] - n,
        context_lens=metadata.context_lens[n:], block_tables=metadata.block_tables[n:],
        slot_mapping=metadata.slot_mapping[n:], logit_indices=metadata.logit_indices[:0],
        is_prompt=True, prompt_lens=_slice(metadata.prompt_lens, n, None))
    return LeadingDecodes(n, decodes, rest)


def _slice(values: list[int] | None, start: int, stop: int | None) -> list[int] | None:
    return None if values is None else values[start:stop]


def build_input_metadata(query_lens: list[int], context_lens: list[int],
                         block_tables: Sequence[Sequence[int]] | torch.Tensor,
                         slot_mapping: Sequence[int] | torch.Tensor,
                         logit_indices: Sequence[int] | torch.Tensor,
                         device: torch.device, *,
                         query_start_loc: torch.Tensor | None = None,
                         context_lens_tensor: torch.Tensor | None = None,
                         cascade_block_size: int | None = None,
                         host_block_tables: torch.Tensor | None = None,
                         prompt_lens: Sequence[int] | None = None) -> InputMetadata:
    """The one way to build an ``InputMetadata``: host lists or tensors (or tensors already on
    ``device``, e.g. the static buffers of a CUDA graph or a step's staged inputs) in, tensors
    on ``device`` out. Block tables given as lists are padded with 0 to the longest. With
    ``cascade_block_size`` (the cache's block size) and the block tables on the host (given
    as ``block_tables``, or as ``host_block_tables`` beside a device copy), a decode step is
    checked for a shared prefix (``plan_cascade``)."""
    if query_start_loc is None:
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        query_start_loc = torch.tensor(cu, dtype=torch.int32)
    if context_lens_tensor is None:
        context_lens_tensor = torch.tensor(context_lens, dtype=torch.int32)
    cascade = None
    if not isinstance(block_tables, torch.Tensor):
        width = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        block_tables = torch.tensor(padded, dtype=torch.int32).view(len(padded), width)
    planned = host_block_tables if host_block_tables is not None else block_tables
    if cascade_block_size is not None and planned.device.type == "cpu":
        cascade = plan_cascade(list(query_lens), list(context_lens), planned,
                               cascade_block_size, device)
    return InputMetadata(
        query_lens=list(query_lens), context_lens_host=list(context_lens),
        query_start_loc=_as_tensor(query_start_loc, torch.int32, device),
        context_lens=_as_tensor(context_lens_tensor, torch.int32, device),
        block_tables=_as_tensor(block_tables, torch.int32, device),
        slot_mapping=_as_tensor(slot_mapping, torch.int64, device),
        logit_indices=_as_tensor(logit_indices, torch.int64, device),
        is_prompt=len(slot_mapping) > len(query_lens), cascade=cascade,
        prompt_lens=None if prompt_lens is None else list(prompt_lens))


def _as_tensor(values: Sequence[int] | torch.Tensor, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=dtype, non_blocking=True)
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
