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

import numpy as np
import torch

from cacheflow_runtime.attention import InputMetadata, PagedAttention, build_input_metadata
from cacheflow_runtime.config import LOGPROBS_MODES
from cacheflow_runtime.core.step_data import (
    PLACEHOLDER_TOKEN_ID,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from cacheflow_runtime.model_executor.cache_engine import KVCache
from cacheflow_runtime.model_executor.cuda_graphs import DecodeGraphs
from cacheflow_runtime.model_executor.input_staging import InputStaging
from cacheflow_runtime.model_executor.request_states import RequestState, RequestStates
from cacheflow_runtime.sampler import Sampler
from cacheflow_runtime.sampler_output import DeviceSamples
from cacheflow_runtime.sampling_metadata import DecodeRows, Logprobs, SamplingGroup


@dataclass
class PreparedBatch:
    """Model inputs of one step plus the sampler's view of it (``req_ids[i]`` owns
    ``sampling_groups[i]``; ``sampled[i]`` says whether it samples tokens this step; the
    step's columnar decodes own the first ``num_decodes`` logit rows).
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
    num_decodes: int = 0


class _StepTokens:
    """The flattened tokens of a step, gathered sequence by sequence: per sequence its block
    table row, first position and token count, plus the hidden-state rows the sampler needs
    (``logit_indices``) and the placeholder tokens to fill on the device. ``prompt_lens`` is
    kept once a sequence that is not a columnar decode joins (0 for those decodes)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.starts: list[int] = []
        self.counts: list[int] = []
        self.input_ids: list[int] = []
        self.logit_indices: list[int] = []
        self.placeholder_positions: list[int] = []
        self.placeholder_seq_ids: list[int] = []
        self.prompt_lens: list[int] = []


def prepare_batch(out: SchedulerOutput, states: RequestStates, block_size: int,
                  staging: InputStaging, eos_token_ids: frozenset[int],
                  plan_cascade: bool = True) -> PreparedBatch:
    """Flattens the scheduled sequences of ``out`` into one batch (``states`` already updated
    with ``out``): each contributes ``token_ids`` from ``num_computed_tokens`` on, its K/V going
    to the slots its block table gives. ``plan_cascade``: look for a prefix shared by a whole
    decode step (cascade attention).

    The columnar decodes come first, taken a column at a time; then one short loop over the
    other sequences. Positions, slots and the step's block tables are computed from the
    worker's :class:`BlockTables` with array operations, and go to ``staging.device`` in one
    copy (:class:`InputStaging`).
    """
    step = _StepTokens()
    row_of = states.tables.row_of
    decodes = out.decodes
    num_decodes = len(decodes.seq_ids)
    if num_decodes:
        step.rows = [row_of[seq_id] for seq_id in decodes.seq_ids]
        step.starts = list(decodes.num_computed_tokens)
        step.counts = [1] * num_decodes
        step.input_ids = list(decodes.token_ids)
        step.logit_indices = list(range(num_decodes))
        if PLACEHOLDER_TOKEN_ID in decodes.token_ids:
            step.placeholder_positions = [i for i, t in enumerate(decodes.token_ids)
                                          if t == PLACEHOLDER_TOKEN_ID]
            step.placeholder_seq_ids = [decodes.seq_ids[i] for i in step.placeholder_positions]
    groups: list[SamplingGroup] = []
    req_ids: list[str] = []
    sampled: list[bool] = []
    for req in out.scheduled:
        state = states.requests[req.req_id]
        rows, prompt_rows, prompt_start = _add_request(step, req, state, row_of)
        if not rows and not prompt_rows:
            continue
        if len(req.seqs) == 1:  # most requests: skip the per-sequence comprehensions
            s = req.seqs[0]
            seq = states.seqs[s.seq_id]
            seq_ids, outputs, cumulative = [s.seq_id], [seq.output_token_ids], [
                s.cumulative_logprob]
            keys = (list(state.seed_keys) if req.is_first_sample
                    else [state.seed_keys[seq.sample_index]])
        else:
            seqs = [states.seqs[s.seq_id] for s in req.seqs]
            seq_ids = [s.seq_id for s in req.seqs]
            outputs = [seq.output_token_ids for seq in seqs]
            cumulative = [s.cumulative_logprob for s in req.seqs]
            keys = (list(state.seed_keys) if req.is_first_sample
                    else [state.seed_keys[seq.sample_index] for seq in seqs])
        groups.append(SamplingGroup(
            seq_ids=seq_ids, sampling_params=state.sampling_params,
            is_prompt=req.is_first_sample, logit_rows=rows,
            prompt_token_ids=state.prompt_token_ids, output_token_ids=outputs,
            cumulative_logprobs=cumulative, seed_keys=keys,
            prompt_logit_rows=prompt_rows, prompt_logprobs_start=prompt_start,
            eos_token_ids=eos_token_ids))
        req_ids.append(req.req_id)
        sampled.append(req.do_sample)
    input_ids, positions, metadata = _step_inputs(step, states, block_size, staging,
                                                  plan_cascade)
    return PreparedBatch(
        input_ids=input_ids, positions=positions,
        metadata=metadata, sampling_groups=groups, req_ids=req_ids, sampled=sampled,
        placeholder_positions=step.placeholder_positions,
        placeholder_seq_ids=step.placeholder_seq_ids, num_decodes=num_decodes)


def _step_inputs(step: _StepTokens, states: RequestStates, block_size: int,
                 staging: InputStaging, plan_cascade: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, InputMetadata]:
    """The step's token ids and positions (int64) and the attention metadata of its tokens,
    on the device."""
    tables = states.tables
    rows = np.array(step.rows, dtype=np.int64)
    starts = np.array(step.starts, dtype=np.int64)
    counts = np.array(step.counts, dtype=np.int64)
    num_seqs, num_tokens = len(step.rows), len(step.input_ids)
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start_loc[1:])
    if num_tokens == num_seqs:  # a decode step: one token per sequence
        positions, token_rows = starts, rows
    else:
        seq_of_token = np.repeat(np.arange(num_seqs), counts)
        positions = (np.arange(num_tokens, dtype=np.int64)
                     - query_start_loc[:-1].astype(np.int64)[seq_of_token]
                     + starts[seq_of_token])
        token_rows = rows[seq_of_token]
    context_lens = (starts + counts).astype(np.int32)
    block_tables = tables.gather(rows)
    (input_ids, positions_dev, query_start_loc_dev, context_lens_dev, block_tables_dev,
     slot_mapping, logit_indices) = staging.upload([
        np.array(step.input_ids, dtype=np.int64), positions, query_start_loc, context_lens,
        block_tables, tables.slots(token_rows, positions, block_size),
        np.array(step.logit_indices, dtype=np.int64)])
    metadata = build_input_metadata(
        step.counts, context_lens.tolist(), block_tables_dev, slot_mapping, logit_indices,
        staging.device, query_start_loc=query_start_loc_dev,
        context_lens_tensor=context_lens_dev,
        cascade_block_size=block_size if plan_cascade else None,
        host_block_tables=torch.from_numpy(block_tables) if plan_cascade else None,
        prompt_lens=step.prompt_lens or None)
    return input_ids, positions_dev, metadata


def _add_request(step: _StepTokens, req: ScheduledRequest, state: RequestState,
                 row_of: dict[int, int]) -> tuple[list[int], list[int], int]:
    """Adds a request's sequences; returns its sampling rows, prompt-logprob rows and the
    prompt position of the first prompt-logprob row."""
    rows: list[int] = []
    prompt_rows: list[int] = []
    prompt_start = state.num_prompt_logprobs
    want_prompt = state.sampling_params.prompt_logprobs is not None
    prompt_len = len(state.prompt_token_ids)
    logit_indices = step.logit_indices
    if len(step.prompt_lens) < len(step.rows):
        step.prompt_lens.extend([0] * (len(step.rows) - len(step.prompt_lens)))
    step.prompt_lens.extend([prompt_len] * len(req.seqs))
    for s in req.seqs:
        token_ids = s.token_ids
        num_tokens = len(token_ids)
        offset = len(step.input_ids)
        start = s.num_computed_tokens
        step.rows.append(row_of[s.seq_id])
        step.starts.append(start)
        step.counts.append(num_tokens)
        if num_tokens == 1:  # a decode token: most sequences of most steps
            step.input_ids.append(token_ids[0])
        else:
            step.input_ids.extend(token_ids)
        if token_ids[-1] == PLACEHOLDER_TOKEN_ID:
            step.placeholder_positions.append(offset + num_tokens - 1)
            step.placeholder_seq_ids.append(s.seq_id)
        if want_prompt:
            # Positions p < prompt_len - 1 predict prompt token p + 1; each is computed once.
            lo, hi = max(start, state.num_prompt_logprobs), min(start + num_tokens,
                                                                 prompt_len - 1)
            if hi > lo:
                prompt_start = lo
                first = len(logit_indices)
                logit_indices.extend(range(offset + lo - start, offset + hi - start))
                prompt_rows = list(range(first, len(logit_indices)))
                state.num_prompt_logprobs = hi
        if req.do_sample:
            rows.append(len(logit_indices))
            logit_indices.append(offset + num_tokens - 1)
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

    def ready(self) -> bool:
        """Whether the step's samples are on the host (``result`` would not wait)."""
        return self.samples is None or self.samples.ready()

    def result(self) -> ModelRunnerOutput:
        """The sampled tokens and prompt logprobs of the step (blocks until they are on the
        host)."""
        output = ModelRunnerOutput()
        if self.samples is None:
            return output
        output.decode_token_ids, output.decode_logprobs = self.samples.assemble_decodes()
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
    """Runs one step of the model over a prepared batch and samples from its logits
    (``logprobs_mode``: what the sampler reports as logprobs, ``config.LOGPROBS_MODES``)."""

    def __init__(self, model: Any, device: torch.device, block_size: int,
                 eos_token_ids: frozenset[int], default_generator: Optional[torch.Generator],
                 logprobs_mode: str = LOGPROBS_MODES[0]) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(logprobs_mode=logprobs_mode)
        self.default_generator = default_generator
        self.decode_graphs: Optional[DecodeGraphs] = None
        self.staging = InputStaging(device)
        # The last launch's sampled token ids (on the device) and the sequence of each of the
        # first len(seq_ids) of them (greedy and random samples), for the placeholders of the
        # next launch.
        self._last_sampled: Optional[tuple[torch.Tensor, list[int]]] = None
        # The sampler's rows of the last step's columnar decodes, with the request changes
        # count and the request ids they were built for (reused while both are the same).
        self._decode_rows: Optional[tuple[int, list[str], DecodeRows]] = None
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
        if not (out.scheduled or out.decodes.seq_ids):
            return PendingStep()
        batch = prepare_batch(out, states, self.block_size, self.staging, self.eos_token_ids,
                              self.plan_cascade)
        if batch.placeholder_positions:
            self._fill_placeholders(batch, previous)
        hidden = None
        if self.decode_graphs is not None:
            hidden = self.decode_graphs.run(batch.input_ids, batch.positions, batch.metadata)
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, kv_caches, batch.metadata)
        if not batch.sampling_groups and not batch.num_decodes:
            return PendingStep()
        logits = self.model.compute_logits(hidden[batch.metadata.logit_indices])
        decode_rows = self._rows_of_decodes(out, states) if batch.num_decodes else None
        positions = None
        if ((decode_rows is not None and decode_rows.seed_keys is not None)
                or any(g.sampling_params.seed is not None for g in batch.sampling_groups)):
            # Where each logits row's token goes: one past the row's input position.
            positions = batch.positions.index_select(0, batch.metadata.logit_indices) + 1
        samples = self.sampler.sample(logits, batch.sampling_groups, self.default_generator,
                                      decode_rows, positions)
        seq_ids = [s.parent_seq_id for s in samples.samples]
        self._last_sampled = (samples.all_tokens,
                              out.decodes.seq_ids + seq_ids if batch.num_decodes else seq_ids)
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

    def _rows_of_decodes(self, out: SchedulerOutput, states: RequestStates) -> DecodeRows:
        """The sampler's rows of the step's columnar decodes: those of the step before when it
        decoded the same requests, else built from the requests' parameters and seed keys."""
        req_ids = out.decodes.req_ids
        cached = self._decode_rows
        if (cached is not None and cached[0] == states.num_request_changes
                and cached[1] == req_ids):
            return cached[2]
        requests = [states.requests[req_id] for req_id in req_ids]
        rows = DecodeRows.build([r.sampling_params for r in requests],
                                [r.seed_keys[0] for r in requests], self.device)
        self._decode_rows = (states.num_request_changes, list(req_ids), rows)
        return rows

    def _fill_placeholders(self, batch: PreparedBatch,
                           previous: Optional[tuple[torch.Tensor, list[int]]]) -> None:
        """Puts into the batch's placeholder positions the tokens the previous launch sampled
        for their sequences (a device-side gather: the step queues behind that one)."""
        tokens, seq_ids = previous if previous is not None else (None, [])
        wanted = batch.placeholder_seq_ids
        n = len(wanted)
        # The steady decode step: the first n inputs (positions ascending) are placeholders for
        # the first n samples of the step before, in the same order.
        if (tokens is not None and batch.placeholder_positions[-1] == n - 1
                and wanted == seq_ids[:n]):
            batch.input_ids[:n].copy_(tokens[:n])
            return
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
