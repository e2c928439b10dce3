"""Worker: owns the model, its KV cache and the model runner on one device.

It is driven through the plain-data step interface only (``execute_model(SchedulerOutput) ->
ModelRunnerOutput``, or ``execute_model_async`` whose handle gives it later), so it can live in
the engine's process or in another one. Steps run in the order they are given.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import torch

from cacheflow_runtime.attention import build_input_metadata
from cacheflow_runtime.config import CacheConfig, ModelConfig, SchedulerConfig, resolve_device
from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput
from cacheflow_runtime.model_executor.cache_engine import CacheEngine, block_bytes
from cacheflow_runtime.model_executor.cuda_graphs import capture_sizes, supports_graphs
from cacheflow_runtime.model_executor.model_runner import ModelRunner, PendingStep
from cacheflow_runtime.model_executor.request_states import RequestStates
from cacheflow_runtime.model_loader import load_model
from cacheflow_runtime.parallel_state import get_tensor_parallel_world_size

_GIB = 1 << 30


def profile_sequence_lengths(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the largest step the scheduler can form, for the memory profile:
    ``max_num_batched_tokens`` tokens as sequences of at most ``max_model_len`` tokens (so that
    every position stays within the model's range)."""
    max_len = max(1, max_model_len)
    lens = [max_len] * (max_num_batched_tokens // max_len)
    if max_num_batched_tokens % max_len:
        lens.append(max_num_batched_tokens % max_len)
    return lens


class Worker:
    """One device's share of the engine: model, KV cache, the requests it knows and the step that
    runs them. ``rank`` is its tensor-parallel rank (0 for a single worker)."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, device: str | torch.device = "auto",
                 seed: int = 0, rank: int = 0, enforce_eager: bool = False) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = resolve_device(device)
        self.rank = rank
        self.enforce_eager = enforce_eager
        torch.manual_seed(seed)
        # On the device: unseeded noise is drawn where the logits are, not on the host.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.model = load_model(model_config, self.device)
        self.cache_engine: Optional[CacheEngine] = None
        self.states = RequestStates()
        self.uses_cuda_graphs = False
        self.runner = ModelRunner(self.model, self.device, cache_config.block_size,
                                  model_config.eos_token_ids, self.generator,
                                  model_config.logprobs_mode)

    def determine_num_available_blocks(self) -> tuple[int, int]:
        """(device blocks, cpu blocks) the cache can have, from the config or from memory."""
        per_block = block_bytes(self.model_config, self.cache_config.block_size,
                                get_tensor_parallel_world_size(),
                                cache_dtype=self.cache_config.cache_dtype)
        cpu_blocks = self.cache_config.num_cpu_blocks
        if cpu_blocks is None:
            cpu_blocks = int(self.cache_config.swap_space * _GIB) // per_block
        if self.cache_config.num_device_blocks is not None:
            return self.cache_config.num_device_blocks, cpu_blocks
        if self.device.type == "cpu":
            budget = int(self.cache_config.cpu_kv_cache_gib * _GIB)
        else:
            budget = self._profile_free_memory(self.scheduler_config.max_num_batched_tokens)
        device_blocks = budget // per_block
        if device_blocks < 1:
            raise RuntimeError("no memory is left for the KV cache after loading the model; "
                               "lower max_num_batched_tokens or raise gpu_memory_utilization")
        return device_blocks, cpu_blocks

    def _profile_free_memory(self, max_num_batched_tokens: int) -> int:
        """Bytes left for the KV cache under gpu_memory_utilization after a peak-sized forward,
        less the memory the decode graphs' pool will hold (see ``_graph_pool_estimate``)."""
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(self.device)
        lens = profile_sequence_lengths(max_num_batched_tokens, self.model_config.max_model_len)
        peak = self._forward_peak(lens)
        graph_pool = self._graph_pool_estimate(before)
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory torch's allocator does not hold: the CUDA context, libraries, other processes.
        outside_torch = max(0, total - free - torch.cuda.memory_reserved(self.device))
        return (int(total * self.cache_config.gpu_memory_utilization) - peak - graph_pool
                - outside_torch)

    def _graph_pool_estimate(self, baseline: int) -> int:
        """The memory the CUDA graphs of decode steps will keep (0 when none will be captured):
        their private pool holds the activations of the largest captured batch, measured
        here as the peak of an eager forward of that many one-token sequences above
        ``baseline`` (the bytes allocated before any forward)."""
        if self.enforce_eager or not supports_graphs(self.model, self.cache_config.block_size):
            return 0
        largest = max(capture_sizes(self.scheduler_config.max_num_seqs))
        return max(0, self._forward_peak([1] * largest) - baseline)

    def _forward_peak(self, lens: list[int]) -> int:
        """Peak bytes allocated during one forward (and the logits) of prompts of ``lens``
        tokens, without a KV cache."""
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = sum(lens)
        dev = self.device
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        ends = list(itertools.accumulate(lens))
        metadata = build_input_metadata(lens, lens, [[] for _ in lens], [-1] * num_tokens,
                                        [e - 1 for e in ends], dev)
        with torch.inference_mode():
            hidden = self.model(ids, positions, [None] * self.model_config.num_layers, metadata)
            self.model.compute_logits(hidden[metadata.logit_indices])
        torch.cuda.synchronize(self.device)
        del ids, positions, metadata, hidden
        return torch.cuda.max_memory_allocated(self.device)

    def initialize_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        """Allocates the KV cache, then captures CUDA graphs of decode steps when the device and
        the model allow it (and ``enforce_eager`` is off)."""
        self.cache_engine = CacheEngine(self.model_config, self.cache_config, self.device,
                                        num_device_blocks, num_cpu_blocks,
                                        get_tensor_parallel_world_size())
        if (not self.enforce_eager and self.device.type == "cuda"
                and supports_graphs(self.model, self.cache_config.block_size)):
            self.runner.capture_decode_graphs(self.cache_engine.device_cache,
                                              self.scheduler_config.max_num_seqs,
                                              self.scheduler_config.max_model_len)
            self.uses_cuda_graphs = True

    def cuda_graph_usage(self) -> Optional[dict[str, Any]]:
        """How decode steps used the CUDA graphs so far (``CudaGraphUsage.as_dict``), or None
        without graphs."""
        graphs = self.runner.decode_graphs
        return None if graphs is None else graphs.usage.as_dict()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Runs the step to its end and returns the sampled tokens."""
        return self.execute_model_async(scheduler_output).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingStep:
        """Applies the step to the worker's request state, queues the KV block moves (swap-in,
        swap-out, copy-on-write), the model and the sampling, and returns without waiting for
        the device."""
        assert self.cache_engine is not None, "initialize_cache() must run before a step"
        self.states.apply(scheduler_output)
        self.cache_engine.swap_in(scheduler_output.blocks_to_swap_in)
        self.cache_engine.swap_out(scheduler_output.blocks_to_swap_out)
        self.cache_engine.copy(scheduler_output.blocks_to_copy)
        return self.runner.launch(scheduler_output, self.states, self.cache_engine.device_cache)
