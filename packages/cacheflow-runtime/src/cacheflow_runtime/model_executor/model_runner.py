"""Turns a scheduled batch into model inputs, runs the model and samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.model_executor.cache_engine import KVCache
from cacheflow_runtime.model_executor.cuda_graphs import DecodeGraphs
from cacheflow_runtime.sampler import Sampler
from cacheflow_runtime.sampling_metadata import GroupSampleResult, SamplingGroup
from cacheflow_runtime.sequence import SequenceGroup, SequenceStatus


@dataclass
class PreparedBatch:
    """Model inputs of one step plus the sampler's view of it."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: InputMetadata
    sampling_groups: list[SamplingGroup]


def prepare_batch(groups: list[SequenceGroup], block_tables: dict[int, list[int]],
                  block_size: int, device: torch.device,
                  eos_token_id: Optional[int]) -> PreparedBatch:
    """Flattens the RUNNING sequences of ``groups`` into one batch.

    Each sequence contributes its tokens from ``num_computed_tokens`` on (the whole prompt at
    prefill, the newest token at decode); their K/V go to the slots its block table gives.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    tables: list[list[int]] = []
    logit_indices: list[int] = []
    sampling_groups: list[SamplingGroup] = []
    is_prompt = False
    for group in groups:
        seqs = group.get_seqs(SequenceStatus.RUNNING)
        params = group.sampling_params
        first_step = group.is_prefill
        want_prompt_logprobs = first_step and params.prompt_logprobs is not None
        rows: list[int] = []
        prompt_rows: list[int] = []
        for seq in seqs:
            tokens = seq.get_token_ids()
            start, end = seq.num_computed_tokens, len(tokens)
            is_prompt = is_prompt or end - start > 1 or first_step
            table = block_tables[seq.seq_id]
            offset = len(input_ids)
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(start, end))
            query_lens.append(end - start)
            context_lens.append(end)
            tables.append(table)
            if want_prompt_logprobs:
                prompt_rows = list(range(len(logit_indices), len(logit_indices) + end - 1))
                logit_indices.extend(range(offset, offset + end - 1))
            rows.append(len(logit_indices))
            logit_indices.append(offset + end - start - 1)
        generators = ([seq.generator for seq in seqs] if not first_step
                      else list(group.child_generators))
        sampling_groups.append(SamplingGroup(
            seq_ids=[seq.seq_id for seq in seqs], sampling_params=params, is_prompt=first_step,
            logit_rows=rows, prompt_token_ids=group.prompt_token_ids,
            output_token_ids=[list(seq.output_token_ids) for seq in seqs],
            cumulative_logprobs=[seq.cumulative_logprob for seq in seqs],
            generators=generators, prompt_logit_rows=prompt_rows, eos_token_id=eos_token_id))
    max_blocks = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]
    cu = [0]
    for q in query_lens:
        cu.append(cu[-1] + q)
    metadata = InputMetadata(
        query_lens=query_lens, context_lens_host=context_lens,
        query_start_loc=torch.tensor(cu, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(tables),
                                                                                max_blocks),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        logit_indices=torch.tensor(logit_indices, dtype=torch.int64, device=device),
        is_prompt=is_prompt)
    return PreparedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        metadata=metadata, sampling_groups=sampling_groups)


class ModelRunner:
    """Runs one step of the model over a prepared batch and samples from its logits."""

    def __init__(self, model: Any, device: torch.device, block_size: int,
                 eos_token_id: Optional[int], default_generator: Optional[torch.Generator]
                 ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        self.sampler = Sampler()
        self.default_generator = default_generator
        self.decode_graphs: Optional[DecodeGraphs] = None

    def capture_decode_graphs(self, kv_caches: list[KVCache], max_num_seqs: int,
                              max_model_len: int) -> None:
        """Captures CUDA graphs of decode steps over ``kv_caches`` (see cuda_graphs.py)."""
        self.decode_graphs = DecodeGraphs(self.model, self.device, kv_caches, self.block_size,
                                          max_num_seqs, max_model_len)

    @torch.inference_mode()
    def execute(self, groups: list[SequenceGroup], block_tables: dict[int, list[int]],
                kv_caches: list[KVCache]) -> list[GroupSampleResult]:
        """Runs the model on ``groups`` and returns one sampling result per group."""
        batch = prepare_batch(groups, block_tables, self.block_size, self.device,
                              self.eos_token_id)
        hidden = None
        if self.decode_graphs is not None:
            hidden = self.decode_graphs.run(batch.input_ids, batch.positions, batch.metadata)
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, kv_caches, batch.metadata)
        logits = self.model.compute_logits(hidden[batch.metadata.logit_indices])
        return self.sampler(logits, batch.sampling_groups, self.default_generator)
