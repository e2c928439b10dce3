"""Turns one step's scheduler output into model inputs, runs the model and samples.

``ModelRunner.launch`` queues a step's device work (inputs, forward, sampling, the copy of the
samples to host memory) and returns a :class:`PendingStep` at once; ``PendingStep.result``
waits for the samples and builds the ``ModelRunnerOutput``. A placeholder token in a step
(asynchronous scheduling, core/step_data.py) is replaced on the device by the token the
previous launch sampled for that sequence, so no host round trip separates the two steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cacheflow_runtime.attention import InputMetadata, PagedAttention, build_input_metadata
from cacheflow_runtime.core.step_data import (
    PLACEHOLDER_TOKEN_ID,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from cacheflow_runtime.model_executor.cache_engine import KVCache
from cacheflow_runtime.model_executor.cuda_graphs import DecodeGraphs
from cacheflow_runtime.model_executor.request_states import (
    RequestState,
    RequestStates,
    SequenceState,
)
from cacheflow_runtime.sampler import Sampler
from cacheflow_runtime.sampler_output import DeviceSamples
from cacheflow_runtime.sampling_metadata import Logprobs, SamplingGroup


@dataclass
class PreparedBatch:
    """Model inputs of one step plus the sampler's view of it (``req_ids[i]`` owns
    ``sampling_groups[i]``; ``sampled[i]`` says whether it samples tokens this step).
    ``input_ids[placeholder_positions[i]]`` is a placeholder for the token last sampled for
    sequence ``placeholder_seq_ids[i]``."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: InputMetadata
    sampling_groups: list[SamplingGroup] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    placeholder_positions: list[int] = field(default_factory=list)
    placeholder_seq_ids: list[int] = field(default_factory=list)


class _BatchBuilder:
    """Accumulates the flattened tokens, slots and logit rows of a step, request by request."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.input_ids: list[int] = []
        self.positions: list[int] = []
        self.slots: list[int] = []
        self.query_lens: list[int] = []
        self.context_lens: list[int] = []
        self.tables: list[list[int]] = []
        self.logit_indices: list[int] = []
        self.placeholder_positions: list[int] = []
        self.placeholder_seq_ids: list[int] = []

    def add_sequence(self, token_ids: list[int], start: int, table: list[int]) -> int:
        """Adds one sequence's tokens at positions ``start..``; returns its first flat index."""
        offset = len(self.input_ids)
        num_tokens = len(token_ids)
        end = start + num_tokens
        bs = self.block_size
        if num_tokens == 1:  # a decode token: most sequences of most steps
            self.input_ids.append(token_ids[0])
            self.positions.append(start)
            self.slots.append(table[start // bs] * bs + start % bs)
        else:
            self.input_ids.extend(token_ids)
            self.positions.extend(range(start, end))
            self.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        self.query_lens.append(num_tokens)
        self.context_lens.append(end)
        self.tables.append(table)
        return offset

    def add_logit_rows(self, flat_indices: range | list[int]) -> list[int]:
        """Asks for the hidden states at ``flat_indices``; returns their logit row numbers."""
        first = len(self.logit_indices)
        self.logit_indices.extend(flat_indices)
        return list(range(first, len(self.logit_indices)))

    def add_logit_row(self, flat_index: int) -> int:
        """Asks for the hidden state at ``flat_index``; returns its logit row number."""
        self.logit_indices.append(flat_index)
        return len(self.logit_indices) - 1


def prepare_batch(out: SchedulerOutput, states: RequestStates, block_size: int,
                  device: torch.device, eos_token_id: Optional[int],
                  plan_cascade: bool = True) -> PreparedBatch:
    """Flattens the scheduled sequences of ``out`` into one batch (``states`` already updated
    with ``out``): each contributes ``token_ids`` from ``num_computed_tokens`` on, its K/V going
    to the slots its block table gives. ``plan_cascade``: look for a prefix shared by a whole
    decode step (cascade attention)."""
    builder = _BatchBuilder(block_size)
    groups: list[SamplingGroup] = []
    req_ids: list[str] = []
    sampled: list[bool] = []
    for req in out.scheduled:
        state = states.requests[req.req_id]
        seqs = [states.seqs[s.seq_id] for s in req.seqs]
        rows, prompt_rows, prompt_start = _add_request(builder, req, state, seqs)
        if not rows and not prompt_rows:
            continue
        generators = (list(state.generators) if req.is_first_sample
                      else [state.generators[seq.sample_index] for seq in seqs])
        groups.append(SamplingGroup(
            seq_ids=[s.seq_id for s in req.seqs], sampling_params=state.sampling_params,
            is_prompt=req.is_first_sample, logit_rows=rows,
            prompt_token_ids=state.prompt_token_ids,
            output_token_ids=[seq.output_token_ids for seq in seqs],
            cumulative_logprobs=[s.cumulative_logprob for s in req.seqs],
            generators=generators, prompt_logit_rows=prompt_rows,
            prompt_logprobs_start=prompt_start, eos_token_id=eos_token_id))
        req_ids.append(req.req_id)
        sampled.append(req.do_sample)
    metadata = build_input_metadata(builder.query_lens, builder.context_lens, builder.tables,
                                    builder.slots, builder.logit_indices, device,
                                    cascade_block_size=block_size if plan_cascade else None)
    return PreparedBatch(
        input_ids=torch.tensor(builder.input_ids, dtype=torch.int64).to(device,
                                                                       non_blocking=True),
        positions=torch.tensor(builder.positions, dtype=torch.int64).to(device,
                                                                       non_blocking=True),
        metadata=metadata, sampling_groups=groups, req_ids=req_ids, sampled=sampled,
        placeholder_positions=builder.placeholder_positions,
        placeholder_seq_ids=builder.placeholder_seq_ids)


def _add_request(builder: _BatchBuilder, req: ScheduledRequest, state: RequestState,
                 seqs: list[SequenceState]) -> tuple[list[int], list[int], int]:
    """Adds a request's sequences (``seqs[i]`` is the worker's copy of ``req.seqs[i]``);
    returns its sampling rows, prompt-logprob rows and the prompt position of the first
    prompt-logprob row."""
    rows: list[int] = []
    prompt_rows: list[int] = []
    prompt_start = state.num_prompt_logprobs
    want_prompt = state.sampling_params.prompt_logprobs is not None
    prompt_len = len(state.prompt_token_ids)
    for s, seq in zip(req.seqs, seqs):
        start = s.num_computed_tokens
        offset = builder.add_sequence(s.token_ids, start, seq.block_ids)
        end = start + len(s.token_ids)
        if s.token_ids[-1] == PLACEHOLDER_TOKEN_ID:
            builder.placeholder_positions.append(offset + len(s.token_ids) - 1)
            builder.placeholder_seq_ids.append(s.seq_id)
        # Positions p < prompt_len - 1 predict prompt token p + 1; each is computed once.
        lo, hi = max(start, state.num_prompt_logprobs), min(end, prompt_len - 1)
        if want_prompt and hi > lo:
            prompt_start = lo
            prompt_rows = builder.add_logit_rows(range(offset + lo - start, offset + hi - start))
            state.num_prompt_logprobs = hi
        if req.do_sample:
            rows.append(builder.add_logit_row(offset + len(s.token_ids) - 1))
    return rows, prompt_rows, prompt_start


@dataclass
class PendingStep:
    """A launched step: its device work is queued; ``result`` waits for the samples.

    ``prompt_shares[i]``: None when request ``req_ids[i]`` gets no prompt logprobs this step,
    True for its first share (which starts with None: the first prompt token has no logprob),
    False for a later one. It holds only plain data and the device results, so it stays valid
    while the worker goes on with later steps.
    """

    req_ids: list[str] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    prompt_shares: list[Optional[bool]] = field(default_factory=list)
    samples: Optional[DeviceSamples] = None

    def result(self) -> ModelRunnerOutput:
        """The sampled tokens and prompt logprobs of the step (blocks until they are on the
        host)."""
        output = ModelRunnerOutput()
        if self.samples is None:
            return output
        results = self.samples.assemble()
        for req_id, res, sampled, first in zip(self.req_ids, results, self.sampled,
                                               self.prompt_shares):
            if sampled:
                output.samples[req_id] = res
            if first is not None:
                share: list[Optional[Logprobs]] = list(res.prompt_logprobs or [])
                if first:
                    share.insert(0, None)
                output.prompt_logprobs[req_id] = share
        return output


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
        # The last launch's sampled token ids (on the device) and the sequence of each of the
        # first len(seq_ids) of them (greedy and random samples), for the placeholders of the
        # next launch.
        self._last_sampled: Optional[tuple[torch.Tensor, list[int]]] = None
        # A cascade step runs eagerly, so plan one only if some layer would use it.
        self.plan_cascade = any(m.takes_cascade for m in model.modules()
                                if isinstance(m, PagedAttention))

    def capture_decode_graphs(self, kv_caches: list[KVCache], max_num_seqs: int,
                              max_model_len: int) -> None:
        """Captures CUDA graphs of decode steps over ``kv_caches`` (see cuda_graphs.py)."""
        self.decode_graphs = DecodeGraphs(self.model, self.device, kv_caches, self.block_size,
                                          max_num_seqs, max_model_len)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, states: RequestStates,
               kv_caches: list[KVCache]) -> PendingStep:
        """Queues the step's device work (the model on its scheduled sequences, sampling, the
        copy of the samples to the host) and returns without waiting for it."""
        previous, self._last_sampled = self._last_sampled, None
        if not out.scheduled:
            return PendingStep()
        batch = prepare_batch(out, states, self.block_size, self.device, self.eos_token_id,
                              self.plan_cascade)
        if batch.placeholder_positions:
            self._fill_placeholders(batch, previous)
        hidden = None
        if self.decode_graphs is not None:
            hidden = self.decode_graphs.run(batch.input_ids, batch.positions, batch.metadata)
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, kv_caches, batch.metadata)
        if not batch.sampling_groups:
            return PendingStep()
        logits = self.model.compute_logits(hidden[batch.metadata.logit_indices])
        samples = self.sampler.sample(logits, batch.sampling_groups, self.default_generator)
        self._last_sampled = (samples.tokens, [s.parent_seq_id for s in samples.samples])
        samples.start_copy()
        prompt_shares: list[Optional[bool]] = []
        for req_id, group in zip(batch.req_ids, batch.sampling_groups):
            state = states.requests[req_id]
            first: Optional[bool] = None
            if group.sampling_params.prompt_logprobs is not None and (
                    group.prompt_logit_rows or not state.prompt_logprobs_sent):
                first = not state.prompt_logprobs_sent
                state.prompt_logprobs_sent = True
            prompt_shares.append(first)
        return PendingStep(batch.req_ids, batch.sampled, prompt_shares, samples)

    def _fill_placeholders(self, batch: PreparedBatch,
                           previous: Optional[tuple[torch.Tensor, list[int]]]) -> None:
        """Puts into the batch's placeholder positions the tokens the previous launch sampled
        for their sequences (a device-side gather: the step queues behind that one)."""
        tokens, seq_ids = previous if previous is not None else (None, [])
        row_of = {seq_id: i for i, seq_id in enumerate(seq_ids)}
        missing = [s for s in batch.placeholder_seq_ids if s not in row_of]
        if tokens is None or missing:
            raise RuntimeError(f"sequences {missing or batch.placeholder_seq_ids} were scheduled "
                               "with a placeholder token but the previous step sampled none "
                               "for them")
        rows = torch.tensor([row_of[s] for s in batch.placeholder_seq_ids], dtype=torch.int64)
        positions = torch.tensor(batch.placeholder_positions, dtype=torch.int64)
        batch.input_ids.index_copy_(
            0, positions.to(self.device, non_blocking=True),
            tokens.index_select(0, rows.to(self.device, non_blocking=True)))
