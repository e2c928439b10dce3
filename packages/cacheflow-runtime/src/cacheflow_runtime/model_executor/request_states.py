"""What a worker remembers between steps: per request its prompt, sampling parameters and
per-sample seed keys, per sequence its generated tokens and (in :class:`BlockTables`) its block
table, all kept up to date from each step's
:class:`~cacheflow_runtime.core.step_data.SchedulerOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cacheflow_runtime.core.step_data import NewRequestData, SchedulerOutput
from cacheflow_runtime.model_executor.block_tables import BlockTables
from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.seeded_noise import seed_key


@dataclass
class SequenceState:
    """A worker's copy of one sequence (its block table is a row of the worker's
    :class:`BlockTables`)."""

    output_token_ids: list[int] = field(default_factory=list)
    sample_index: int = 0


@dataclass
class RequestState:
    """A worker's copy of one request; ``seed_keys[i]`` seeds the i-th sample's noise (None: the
    worker's default generator draws it). ``num_prompt_logprobs`` counts the prompt positions whose
    logprobs were computed (each once, even when the prompt is computed again after a
    preemption); ``prompt_logprobs_sent`` whether the first share went out."""

    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed_keys: list[Optional[int]]
    num_prompt_logprobs: int = 0
    prompt_logprobs_sent: bool = False


class RequestStates:
    """The requests and sequences a worker knows, updated from each step's scheduler output."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestState] = {}
        self.seqs: dict[int, SequenceState] = {}
        self.tables = BlockTables()
        # Counts the steps that added or forgot a request: the same request ids under the same
        # count are the same requests (an id can be used again once its request is forgotten).
        self.num_request_changes = 0

    def apply(self, out: SchedulerOutput) -> None:
        """Forgets what the step finished, learns its new requests and applies its deltas."""
        if out.finished_req_ids or out.new_requests:
            self.num_request_changes += 1
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        for seq_id in out.freed_seq_ids:
            self.seqs.pop(seq_id, None)
            self.tables.remove(seq_id)
        for new in out.new_requests:
            self.requests[new.req_id] = _new_request(new)
        decodes = out.decodes
        for row, block_ids in decodes.new_blocks:
            self.tables.extend(decodes.seq_ids[row], block_ids)
        for req in out.scheduled:
            if req.req_id not in self.requests:
                raise KeyError(f"request {req.req_id!r} was scheduled before the worker was "
                               "told about it")
            for s in req.seqs:
                state = self.seqs.get(s.seq_id)
                if state is None:
                    if s.block_ids is None or s.output_token_ids is None:
                        raise KeyError(f"sequence {s.seq_id} is new to the worker but its block "
                                       "table or outputs were not sent")
                    state = self.seqs[s.seq_id] = SequenceState(sample_index=s.sample_index)
                if s.block_ids is not None:
                    self.tables.set(s.seq_id, s.block_ids)
                if s.new_block_ids:
                    self.tables.extend(s.seq_id, s.new_block_ids)
                if s.output_token_ids is not None:
                    state.output_token_ids = list(s.output_token_ids)
                if s.new_output_token_ids:
                    state.output_token_ids.extend(s.new_output_token_ids)


def _new_request(new: NewRequestData) -> RequestState:
    params = new.sampling_params
    seed = params.seed
    keys: list[Optional[int]] = [None if seed is None else seed_key(seed, i)
                                 for i in range(params.best_of or 1)]
    return RequestState(list(new.prompt_token_ids), params, keys)
