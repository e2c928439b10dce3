"""LLMEngine: accepts requests, runs scheduler and worker step by step, returns outputs."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from typing import Any, Optional

import torch

from cacheflow_runtime.config import CacheConfig, ModelConfig, SchedulerConfig, resolve_device
from cacheflow_runtime.core.block_manager import BlockSpaceManager
from cacheflow_runtime.core.scheduler import Scheduler
from cacheflow_runtime.engine.beam_search import beam_step
from cacheflow_runtime.engine.detokenizer import check_stop, decode_new_text, flush_text
from cacheflow_runtime.model_executor.worker import Worker
from cacheflow_runtime.outputs import RequestOutput
from cacheflow_runtime.sampling_metadata import GroupSampleResult, SampleResult
from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.sequence import Sequence, SequenceGroup, SequenceStatus

logger = logging.getLogger(__name__)


def _child_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed for the index-th sequence of a seeded request."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (1 << 63)


class LLMEngine:
    """The synchronous engine: ``add_request``, ``abort_request``, ``step``.

    ``tokenizer`` is any object with ``encode``, ``decode``, ``convert_ids_to_tokens`` and
    ``convert_tokens_to_string`` (an HF tokenizer); cacheflow_models provides one.
    On CUDA, decode steps replay CUDA graphs captured at construction
    (model_executor/cuda_graphs.py); ``enforce_eager=True`` runs every step from Python.
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, tokenizer: Any,
                 device: str | torch.device = "auto", seed: int = 0,
                 enforce_eager: bool = False) -> None:
        if scheduler_config.max_model_len > model_config.max_model_len:
            raise ValueError(f"max_model_len ({scheduler_config.max_model_len}) is larger than "
                             f"the model's limit ({model_config.max_model_len})")
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.tokenizer = tokenizer
        self.device = resolve_device(device)
        self.worker = Worker(model_config, cache_config, self.device, seed)
        num_device_blocks, num_cpu_blocks = self.worker.num_available_blocks(
            scheduler_config.max_num_batched_tokens)
        self.worker.init_cache(num_device_blocks, num_cpu_blocks)
        # Decode steps replay CUDA graphs (on CUDA, for models that allow it) unless
        # enforce_eager: every step then runs the model from Python.
        self.uses_cuda_graphs = not enforce_eager and self.worker.capture_decode_graphs(
            scheduler_config.max_num_seqs, scheduler_config.max_model_len)
        self.block_manager = BlockSpaceManager(cache_config.block_size, num_device_blocks,
                                               num_cpu_blocks)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self._seq_ids = itertools.count()
        self._groups: dict[str, SequenceGroup] = {}
        self._aborted: list[SequenceGroup] = []
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        logger.info("KV cache: %d device blocks, %d cpu blocks of %d tokens", num_device_blocks,
                    num_cpu_blocks, cache_config.block_size)

    # ----------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: Optional[str],
                    sampling_params: SamplingParams,
                    prompt_token_ids: Optional[list[int]] = None,
                    arrival_time: Optional[float] = None) -> None:
        """Queues a request; raises ValueError (and keeps nothing) if it cannot be served."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, "
                             f"got {type(sampling_params).__name__}")
        token_ids = self._prompt_token_ids(prompt, prompt_token_ids)
        self._check_fits(token_ids, sampling_params)
        params = sampling_params
        generators = [self._generator(params.seed, i) for i in range(params.best_of)]
        seq = Sequence(next(self._seq_ids), prompt, token_ids, self.cache_config.block_size,
                       generators[0])
        group = SequenceGroup(request_id, [seq], params, arrival_time)
        group.child_generators = generators
        self._groups[request_id] = group
        self.scheduler.add_seq_group(group)

    def _prompt_token_ids(self, prompt: Optional[str],
                          prompt_token_ids: Optional[list[int]]) -> list[int]:
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("a request needs a prompt or prompt_token_ids")
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_token_ids = list(self.tokenizer.encode(prompt))
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: it must have at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); "
                             f"got {bad[:5]}{' ...' if len(bad) > 5 else ''}")
        return list(prompt_token_ids)

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        max_len = self.scheduler_config.max_model_len
        if len(token_ids) > max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, more than max_model_len "
                             f"({max_len})")
        longest = min(len(token_ids) + (params.max_tokens or max_len), max_len)
        needed = self._blocks_needed(len(token_ids), longest, params.best_of)
        usable = (self.block_manager.num_total_gpu_blocks
                  - self.block_manager.watermark_blocks)
        if needed > usable:
            seqs = f" in each of {params.best_of} sequences" if params.best_of > 1 else ""
            raise ValueError(f"the request needs up to {needed} KV-cache blocks "
                             f"({longest} tokens{seqs}) but the cache has only {usable}; lower "
                             "max_tokens or best_of, or give the cache more blocks")
        if params.best_of > self.scheduler_config.max_num_seqs:
            raise ValueError(f"best_of ({params.best_of}) is larger than max_num_seqs "
                             f"({self.scheduler_config.max_num_seqs})")
        swappable = params.best_of > 1 or self.scheduler_config.preemption_mode == "swap"
        swap_blocks = self.block_manager.num_total_cpu_blocks
        if swappable and needed > swap_blocks:
            raise ValueError(f"the request may be preempted by swapping up to {needed} KV-cache "
                             f"blocks to CPU memory, but the swap space holds {swap_blocks}; "
                             "raise swap_space_gib")

    def _blocks_needed(self, prompt_len: int, longest: int, best_of: int) -> int:
        """The most GPU blocks a request needs at once to make progress when it runs alone.

        A single sequence preempted by recompute comes back as a prompt of its tokens. Anything
        else may be swapped out, and a swap-in (like every decode step) wants one free block per
        sequence on top of the group's blocks: at the last decode step each of the ``best_of``
        sequences holds ``longest - 2`` tokens, sharing only the prompt's full blocks.
        """
        block_size = self.cache_config.block_size
        needed = -(-longest // block_size)
        recomputed = best_of == 1 and self.scheduler_config.preemption_mode == "recompute"
        cached = longest - 2  # tokens in the cache before the last decode step
        if recomputed or cached < prompt_len:
            return needed
        if cached == prompt_len:  # the first decode step: the prompt's blocks are all shared
            held = -(-prompt_len // block_size)
        else:
            shared = prompt_len // block_size
            held = shared + best_of * (-(-cached // block_size) - shared)
        return max(needed, held + best_of)

    def _generator(self, seed: Optional[int], index: int) -> Optional[torch.Generator]:
        if seed is None:
            return None
        return torch.Generator(device="cpu").manual_seed(_child_seed(seed, index))

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stops the given requests; their final outputs come with the next ``step``."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for group in self.scheduler.abort(ids):
            self._aborted.append(group)

    def has_unfinished_requests(self) -> bool:
        """True while any request is queued, running or swapped (or an abort is unreported)."""
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def get_num_unfinished_requests(self) -> int:
        """Number of requests not finished yet."""
        return self.scheduler.num_unfinished()

    # ----------------------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step and returns the outputs of every request it touched."""
        plan = self.scheduler.schedule()
        groups = plan.scheduled
        results: list[GroupSampleResult] = []
        if not plan.is_empty():
            tables = {seq.seq_id: self.block_manager.get_block_table(seq)
                      for group in groups for seq in group.get_seqs(SequenceStatus.RUNNING)}
            results = self.worker.execute(groups, tables, plan.blocks_to_swap_in,
                                          plan.blocks_to_swap_out, plan.blocks_to_copy)
        now = time.monotonic()
        for group, result in zip(groups, results):
            self._process(group, result, now)
        self.scheduler.free_finished()
        outputs = [RequestOutput.from_seq_group(g) for g in groups]
        outputs += [RequestOutput.from_seq_group(g) for g in self._aborted]
        for group in itertools.chain(groups, self._aborted):
            if group.is_finished():
                self._groups.pop(group.request_id, None)
        self._aborted = []
        return outputs

    def _process(self, group: SequenceGroup, result: GroupSampleResult, now: float) -> None:
        running = group.get_seqs(SequenceStatus.RUNNING)
        first = group.is_prefill
        for seq in running:
            if first or seq.num_computed_tokens == 0:
                self.num_prompt_tokens += seq.get_len() - seq.num_computed_tokens
            seq.num_computed_tokens = seq.get_len()
        if first:
            group.first_token_time = now
            group.prompt_logprobs = result.prompt_logprobs
        self.num_generation_tokens += len(running)
        if group.sampling_params.use_beam_search:
            self._process_beams(group, result.samples)
            return
        if first and len(result.samples) > 1:
            self._fork_children(group, running[0], result.samples)
        for seq, sample in zip(group.get_seqs(SequenceStatus.RUNNING), result.samples):
            seq.append_token(sample.token_id, sample.logprobs)
            self._finish_check(group, seq)

    def _fork_children(self, group: SequenceGroup, parent: Sequence,
                       samples: list[SampleResult]) -> None:
        for index in range(1, len(samples)):
            child = parent.fork(next(self._seq_ids), group.child_generators[index])
            self.block_manager.fork(parent, child)
            group.add(child)

    def _finish_check(self, group: SequenceGroup, seq: Sequence) -> None:
        params = group.sampling_params
        new_text = decode_new_text(self.tokenizer, seq, params.skip_special_tokens)
        check_stop(seq, params, new_text, self.model_config.eos_token_id,
                   self.scheduler_config.max_model_len)
        if seq.is_finished():
            if not isinstance(seq.stop_reason, str):  # a stop string has cut the text already
                flush_text(self.tokenizer, seq)
            self.block_manager.free(seq)

    def _process_beams(self, group: SequenceGroup, candidates: list[SampleResult]) -> None:
        params = group.sampling_params
        parents = {seq.seq_id: seq for seq in group.get_seqs(SequenceStatus.RUNNING)}
        max_len = self.scheduler_config.max_model_len
        eos = self.model_config.eos_token_id

        def ends(cand: SampleResult) -> bool:
            parent = parents[cand.parent_seq_id]
            out_len = parent.get_output_len() + 1
            stop_token = (not params.ignore_eos and cand.token_id == eos) or \
                cand.token_id in params.stop_token_ids
            return ((stop_token and out_len >= params.min_tokens)
                    or (params.max_tokens is not None and out_len >= params.max_tokens)
                    or parent.get_len() + 1 >= max_len)

        flags = [ends(c) for c in candidates]
        step = beam_step(group, candidates, flags,
                         {sid: seq.get_output_len() for sid, seq in parents.items()})
        for score, cand in step.finished:
            hyp = parents[cand.parent_seq_id].fork(-1)
            hyp.append_token(cand.token_id, cand.logprobs)
            hyp.output_text = self.tokenizer.decode(
                hyp.output_token_ids, skip_special_tokens=params.skip_special_tokens)
            stopped = cand.token_id == eos or cand.token_id in params.stop_token_ids
            hyp.status = (SequenceStatus.FINISHED_STOPPED if stopped
                          else SequenceStatus.FINISHED_LENGTH_CAPPED)
            group.beam_hypotheses.append((score, hyp))
        group.beam_hypotheses.sort(key=lambda item: item[0], reverse=True)
        del group.beam_hypotheses[params.best_of:]
        if step.done:
            group.beam_search_done = True
            for seq in parents.values():
                seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
                self.block_manager.free(seq)
            group.seqs = [seq for _, seq in group.beam_hypotheses]
            return
        self._advance_beams(group, parents, step.running)

    def _advance_beams(self, group: SequenceGroup, parents: dict[int, Sequence],
                       running: list[SampleResult]) -> None:
        chosen: dict[int, list[SampleResult]] = {}
        for cand in running:
            chosen.setdefault(cand.parent_seq_id, []).append(cand)
        extended: list[tuple[Sequence, SampleResult]] = []
        for parent_id, parent in parents.items():
            picks = chosen.get(parent_id, [])
            if not picks:
                parent.status = SequenceStatus.FINISHED_ABORTED
                self.block_manager.free(parent)
                group.remove(parent_id)
                continue
            for cand in picks[1:]:
                child = parent.fork(next(self._seq_ids))
                self.block_manager.fork(parent, child)
                group.add(child)
                extended.append((child, cand))
            extended.append((parent, picks[0]))
        for seq, cand in extended:
            seq.append_token(cand.token_id, cand.logprobs)
            seq.cumulative_logprob = cand.cumulative_logprob
