"""LLMEngine: accepts requests, runs scheduler and executor step by step, returns outputs.

A step is: the scheduler emits a plain-data ``SchedulerOutput``; the executor runs it on the
worker(s) and returns a ``ModelRunnerOutput``; the scheduler applies it (tokens, forks, beams,
token stop rules); the output processor adds text and stop strings; finished requests are
released and every request that got something new yields a ``RequestOutput``.

With ``async_scheduling`` the steps overlap: once step k is started on the device, step k+1 is
scheduled ahead (placeholders for step k's tokens, core/scheduler.py) and started behind it
before step k's tokens are read, so the host's work of one step runs while the device computes
the other. ``step()`` still returns the outputs of one step, the same as without it; it leaves
at most one step in flight.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, Optional

from cacheflow_runtime.config import (
    CacheConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    is_int,
    resolve_device,
)
from cacheflow_runtime.core.block_manager import BlockSpaceManager
from cacheflow_runtime.core.scheduler import Scheduler
from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput
from cacheflow_runtime.engine.output_processor import OutputProcessor
from cacheflow_runtime.errors import InvalidArgumentError, InvalidRequestError
from cacheflow_runtime.executor import Executor
from cacheflow_runtime.executor.factory import create_executor
from cacheflow_runtime.executor.handle import CompletedStep, StepHandle
from cacheflow_runtime.layers.rotary_embedding import prompt_rotation_key
from cacheflow_runtime.outputs import RequestOutput, request_finished
from cacheflow_runtime.sampling_params import SamplingParams, encode_bad_words
from cacheflow_runtime.sequence import Sequence, SequenceGroup

logger = logging.getLogger(__name__)


def with_tokenizer_eos(model_config: ModelConfig, tokenizer: Any) -> ModelConfig:
    """``model_config`` with the tokenizer's EOS id as its primary EOS (``eos_token_id``) and
    the config's others as extra ones, as vLLM stops at it (a chat fine-tune often names its end
    of turn there and nowhere else) and reports the others' ids as stop reasons."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if (not is_int(eos) or eos == model_config.eos_token_id
            or not 0 <= eos < model_config.vocab_size):
        return model_config
    extra = tuple(i for i in (model_config.eos_token_id, *model_config.extra_eos_token_ids)
                  if i is not None and i != eos)
    return dataclasses.replace(model_config, eos_token_id=int(eos), extra_eos_token_ids=extra)


class LLMEngine:
    """The synchronous engine: ``add_request``, ``abort_request``, ``step``.

    ``tokenizer`` is any object with ``encode``, ``decode``, ``convert_ids_to_tokens`` and
    ``convert_tokens_to_string`` (an HF tokenizer; cacheflow_models provides one), or None: then
    prompts must be token ids and outputs carry token ids only (no text, no stop strings).
    On CUDA, decode steps replay CUDA graphs captured at construction
    (model_executor/cuda_graphs.py); ``enforce_eager=True`` runs every step from Python.
    ``parallel_config`` splits the model over ``tensor_parallel_size`` ranks (worker processes
    or Ray actors, see executor/factory.py); ``shutdown()`` releases them.
    ``scheduler_config.async_scheduling`` overlaps each step's host work with the device work
    of the step before (see the module docstring); ``num_pipelined_steps`` counts the steps
    scheduled ahead that way.
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, tokenizer: Any,
                 device: str | Any = "auto", seed: int = 0,
                 enforce_eager: bool = False,
                 parallel_config: Optional[ParallelConfig] = None) -> None:
        if scheduler_config.max_model_len > model_config.max_model_len:
            raise ValueError(f"max_model_len ({scheduler_config.max_model_len}) is larger than "
                             f"the model's limit ({model_config.max_model_len})")
        model_config = with_tokenizer_eos(model_config, tokenizer)
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.tokenizer = tokenizer
        self.device = resolve_device(device)
        self.parallel_config = parallel_config or ParallelConfig()
        self.enforce_eager = enforce_eager
        self.executor: Executor = create_executor(model_config, cache_config, scheduler_config,
                                                  self.parallel_config, self.device, seed,
                                                  enforce_eager)
        try:
            num_device_blocks, num_cpu_blocks = self.executor.determine_num_available_blocks()
            self.executor.initialize_cache(num_device_blocks, num_cpu_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.uses_cuda_graphs = self.executor.uses_cuda_graphs
        self.block_manager = BlockSpaceManager(
            cache_config.block_size, num_device_blocks, num_cpu_blocks,
            enable_prefix_caching=cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager,
                                   model_config.eos_token_ids, model_config.eos_token_id)
        self.output_processor = OutputProcessor(tokenizer, self.scheduler)
        self._groups: dict[str, SequenceGroup] = {}
        self._aborted: list[SequenceGroup] = []
        self._in_flight: Optional[tuple[SchedulerOutput, StepHandle]] = None
        self.num_pipelined_steps = 0
        logger.info("KV cache (%s): %d device blocks = %d tokens, %d cpu blocks of %d tokens; "
                    "prefix caching %s, chunked prefill %s (%d tokens per step), async "
                    "scheduling %s", cache_config.cache_dtype, num_device_blocks,
                    num_device_blocks * cache_config.block_size, num_cpu_blocks,
                    cache_config.block_size,
                    "on" if cache_config.enable_prefix_caching else "off",
                    "on" if scheduler_config.enable_chunked_prefill else "off",
                    scheduler_config.max_num_batched_tokens,
                    "on" if scheduler_config.async_scheduling else "off")

    @property
    def num_device_blocks(self) -> int:
        """Number of KV cache blocks on the device."""
        return self.block_manager.num_total_gpu_blocks

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens of the requests that have produced a token: each request's whole prompt
        once, at its first token (cached tokens included, recomputed ones not), as vLLM counts
        them."""
        return self.scheduler.num_prompt_tokens

    @property
    def num_generation_tokens(self) -> int:
        """Tokens generated so far."""
        return self.scheduler.num_generation_tokens

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
        token_ids = sampling_params.truncate_prompt(token_ids,
                                                   self.scheduler_config.max_model_len)
        self._check_fits(token_ids, sampling_params)
        self._check_token_ids(sampling_params)
        if sampling_params.bad_words:
            if self.tokenizer is None:
                raise InvalidArgumentError("SamplingParams.bad_words need a tokenizer, and this "
                                           "engine has none", field="SamplingParams.bad_words")
            sampling_params.bad_words_token_ids = encode_bad_words(self.tokenizer,
                                                                   sampling_params.bad_words)
        seq = Sequence(self.scheduler.new_seq_id(), prompt, token_ids,
                       self.cache_config.block_size)
        group = SequenceGroup(request_id, [seq], sampling_params, arrival_time,
                              cache_namespace=prompt_rotation_key(
                                  self.model_config.length_dependent_rope, len(token_ids)))
        self._groups[request_id] = group
        self.scheduler.add_seq_group(group)

    def _prompt_token_ids(self, prompt: Optional[str],
                          prompt_token_ids: Optional[list[int]]) -> list[int]:
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("a request needs a prompt or prompt_token_ids")
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: give prompt_token_ids instead "
                                 "of a text prompt")
            prompt_token_ids = list(self.tokenizer.encode(prompt))
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: it must have at least one token",
                                      param="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not is_int(t) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); "
                                      f"got {bad[:5]}{' ...' if len(bad) > 5 else ''}",
                                      param="prompt")
        return [int(t) for t in prompt_token_ids]

    def _check_token_ids(self, params: SamplingParams) -> None:
        """``logit_bias`` and ``allowed_token_ids`` name ids inside the vocabulary."""
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or {}),
                          ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = sorted({t for t in ids if t >= vocab})
            if bad:
                raise InvalidArgumentError(f"SamplingParams.{name} names token ids outside the "
                                           f"vocabulary [0, {vocab}): {bad[:5]}"
                                           f"{' ...' if len(bad) > 5 else ''}",
                                           field=f"SamplingParams.{name}", value=bad)

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        """Refuses a request that could not finish alone in the KV cache (or in the swap space
        once swapped out), so that an accepted request never waits or is preempted forever."""
        max_len = self.scheduler_config.max_model_len
        prompt_len = len(token_ids)
        if prompt_len > max_len:
            raise ValueError(f"the prompt has {prompt_len} tokens, more than max_model_len "
                             f"({max_len})")
        # The last sampled token is never fed back, so its K/V is never written; a prompt of
        # max_model_len tokens still gets one sampled token.
        longest = min(prompt_len + (params.max_tokens or max_len), max_len)
        kv_tokens = max(prompt_len, longest - 1)
        swapped, num_seqs = self._largest_swap_out(prompt_len, kv_tokens, params.best_of)
        needed = max(self.block_manager.blocks_for(kv_tokens), swapped + num_seqs)
        usable = (self.block_manager.num_total_gpu_blocks
                  - self.block_manager.watermark_blocks)
        if needed > usable:
            seqs = f" in each of {params.best_of} sequences" if params.best_of > 1 else ""
            spare = (", and a free block per sequence to swap back in"
                     if swapped + num_seqs == needed else "")
            raise ValueError(f"the request needs up to {needed} KV-cache blocks (the keys and "
                             f"values of {kv_tokens} tokens{seqs}{spare}) but the cache has "
                             f"only {usable}; lower max_tokens or best_of, or give the cache "
                             "more blocks")
        # The field the user set: best_of when it was raised above n, else n.
        wide = "best_of" if params.best_of != params.n else "n"
        if params.best_of > self.scheduler_config.max_num_seqs:
            raise InvalidRequestError(f"{wide} ({params.best_of}) is larger than max_num_seqs "
                                      f"({self.scheduler_config.max_num_seqs})", param=wide)
        budget = self.scheduler_config.max_num_batched_tokens
        if params.best_of > budget:  # its decode steps need a token per sequence
            raise InvalidRequestError(
                f"{wide} ({params.best_of}) is larger than max_num_batched_tokens ({budget}): a "
                f"decode step of its {params.best_of} sequences would never fit a step",
                param=wide)
        swap_blocks = self.block_manager.num_total_cpu_blocks
        if swapped > swap_blocks:
            raise ValueError(f"the request may be preempted by swapping up to {swapped} KV-cache "
                             f"blocks to CPU memory, but the swap space holds {swap_blocks}; "
                             "raise swap_space")

    def _largest_swap_out(self, prompt_len: int, kv_tokens: int,
                          best_of: int) -> tuple[int, int]:
        """The most GPU blocks a request may hold when it is swapped out, and its running
        sequences then (a swap-in wants one free block per sequence on top); (0, 0) when it is
        never swapped. ``kv_tokens``: the most tokens whose K/V one of its sequences writes.

        The scheduler swaps a group out (instead of recomputing it) in swap mode or while
        several of its sequences run. It holds the most just before its last decode step, each
        sequence then holding ``kv_tokens - 1`` tokens; with no decode step (one output token)
        only a prompt cut into chunks can be swapped out, holding at most as many. Forked
        sequences share the prompt's blocks until their first decode step, and its full blocks
        afterwards (the first write copies the partial one).
        """
        config = self.scheduler_config
        swap_mode = config.preemption_mode == "swap"
        if best_of == 1 and not swap_mode:
            return 0, 0
        blocks_for = self.block_manager.blocks_for
        cached = kv_tokens - 1
        if cached < prompt_len:  # no decode step: one sequence, swapped only inside a prefill
            if not (swap_mode and config.enable_chunked_prefill):
                return 0, 0
            held, num_seqs = blocks_for(cached), 1
        elif cached == prompt_len:  # the first decode step: every block is still shared
            held, num_seqs = blocks_for(prompt_len), best_of
        else:
            shared = prompt_len // self.cache_config.block_size
            held, num_seqs = shared + best_of * (blocks_for(cached) - shared), best_of
        return held, num_seqs

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stops the given requests; their final outputs come with the next ``step``. A request
        that had already finished (under ``step(final_only=True)``, waiting for its text) is not
        changed: its final output still comes once, with its own finish reason."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.output_processor.forget(ids)
        for group in self.scheduler.abort(ids):
            self._aborted.append(group)

    def has_unfinished_requests(self) -> bool:
        """True while any request is queued, running or swapped, an abort is unreported, a
        step is in flight or a finished request waits for its text."""
        return (self.scheduler.has_unfinished() or bool(self._aborted)
                or self._in_flight is not None or self.output_processor.has_finished_backlog)

    def get_num_unfinished_requests(self) -> int:
        """Number of requests not finished yet."""
        return self.scheduler.num_unfinished()

    def get_model(self) -> Any:
        """The model object (for inspection tools such as the models' check tool); only for an
        executor that runs the model in this process.

        Raises:
            ValueError: the model runs in other processes.
        """
        worker = getattr(self.executor, "worker", None)
        if worker is None:
            raise ValueError(f"the model runs outside this process "
                             f"({type(self.executor).__name__}); get_model() needs "
                             "tensor_parallel_size=1")
        return worker.model

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix block (requests in flight keep their blocks)."""
        self.block_manager.reset_prefix_cache()

    # ----------------------------------------------------------------------------- stepping
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Runs one step and returns the outputs of every request that got new tokens, new
        prompt logprobs, or was aborted.

        ``final_only``: only outputs whose ``finished`` is True, for a caller that reads nothing
        else, such as offline generation (a streaming caller needs the default). The text of a
        request without stop strings is then built while the device computes (see
        engine/output_processor.py), so a finished output may come a step or more after the
        step that finished it; every request's final output still comes exactly once, the same
        as the default's.

        With ``async_scheduling`` the step run is the one left in flight by the previous call
        (if any), and the next one is started before its results are read.
        """
        if self._in_flight is None:
            plan = self.scheduler.schedule()
            self._in_flight = (plan, self._start(plan))
        plan, handle = self._in_flight
        self._in_flight = None
        if self.scheduler_config.async_scheduling:
            ahead = self.scheduler.schedule_ahead(plan)
            if ahead is not None:
                self._in_flight = (ahead, self._start(ahead))
                self.num_pipelined_steps += 1
        processor = self.output_processor
        texts_done = processor.build_texts(handle.ready) if processor.has_backlog else []
        touched = self.scheduler.update_from_output(plan, handle.result())
        processor.process(touched, final_only)
        self.scheduler.free_finished()
        reported = touched + self._aborted if self._aborted else touched
        if self._aborted:
            processor.process_aborted(self._aborted)
        if final_only:
            reported = [g for g in reported
                        if request_finished(g) and not processor.text_pending(g)]
        if (processor.has_finished_backlog and self._in_flight is None
                and not self.scheduler.has_unfinished()):
            reported = reported + processor.finish_texts()  # nothing to hide it behind
        reported = texts_done + reported if texts_done else reported
        outputs = [RequestOutput.from_seq_group(g) for g in reported]
        groups = self._groups
        for group in reported:  # (a group whose text is pending was filtered out above)
            if group.is_finished():
                groups.pop(group.request_id, None)
        self._aborted = []
        return outputs

    def _start(self, plan: SchedulerOutput) -> StepHandle:
        """Starts ``plan`` on the executor, unless it asks nothing of the workers."""
        if plan.is_empty() and not (plan.new_requests or plan.finished_req_ids
                                    or plan.freed_seq_ids):
            return CompletedStep(ModelRunnerOutput())
        return self.executor.execute_model_async(plan)

    def shutdown(self) -> None:
        """Releases the executor's workers (a step still in flight is dropped)."""
        self._in_flight = None
        self.executor.shutdown()
