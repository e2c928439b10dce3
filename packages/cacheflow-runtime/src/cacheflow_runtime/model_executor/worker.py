"""Worker: owns the model, its KV cache and the model runner on one device."""

from __future__ import annotations

from typing import Optional

import torch

from cacheflow_runtime.config import CacheConfig, ModelConfig
from cacheflow_runtime.model_executor.cache_engine import CacheEngine, block_bytes
from cacheflow_runtime.model_executor.cuda_graphs import supports_graphs
from cacheflow_runtime.model_executor.model_runner import ModelRunner
from cacheflow_runtime.model_loader import load_model
from cacheflow_runtime.sampling_metadata import GroupSampleResult
from cacheflow_runtime.sequence import SequenceGroup

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
    """One device's share of the engine: model, KV cache and the step that runs them."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 device: torch.device, seed: int = 0) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.device = device
        torch.manual_seed(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.model = load_model(model_config, device)
        self.cache_engine: Optional[CacheEngine] = None
        self.runner = ModelRunner(self.model, device, cache_config.block_size,
                                  model_config.eos_token_id, self.generator)

    def num_available_blocks(self, max_num_batched_tokens: int) -> tuple[int, int]:
        """(device blocks, cpu blocks) the cache can have, from the config or from memory."""
        per_block = block_bytes(self.model_config, self.cache_config.block_size,
                                cache_dtype=self.cache_config.cache_dtype)
        cpu_blocks = self.cache_config.num_cpu_blocks
        if cpu_blocks is None:
            cpu_blocks = int(self.cache_config.swap_space_gib * _GIB) // per_block
        if self.cache_config.num_device_blocks is not None:
            return self.cache_config.num_device_blocks, cpu_blocks
        if self.device.type == "cpu":
            budget = int(self.cache_config.cpu_kv_cache_gib * _GIB)
        else:
            budget = self._profile_free_memory(max_num_batched_tokens)
        device_blocks = budget // per_block
        if device_blocks < 1:
            raise RuntimeError("no memory is left for the KV cache after loading the model; "
                               "lower max_num_batched_tokens or raise gpu_memory_utilization")
        return device_blocks, cpu_blocks

    def _profile_free_memory(self, max_num_batched_tokens: int) -> int:
        """Bytes left for the KV cache under gpu_memory_utilization after a peak-sized forward."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        from cacheflow_runtime.attention import InputMetadata

        lens = profile_sequence_lengths(max_num_batched_tokens, self.model_config.max_model_len)
        num_tokens = sum(lens)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        dev = self.device
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        metadata = InputMetadata(
            query_lens=lens, context_lens_host=lens,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((len(lens), 0), dtype=torch.int32, device=dev),
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=dev),
            logit_indices=torch.tensor(starts[1:], device=dev) - 1, is_prompt=True)
        with torch.inference_mode():
            hidden = self.model(ids, positions, [None] * self.model_config.num_layers, metadata)
            self.model.compute_logits(hidden[metadata.logit_indices])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory torch's allocator does not hold: the CUDA context, libraries, other processes.
        outside_torch = max(0, total - free - torch.cuda.memory_reserved(self.device))
        return int(total * self.cache_config.gpu_memory_utilization) - peak - outside_torch

    def init_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        """Allocates the KV cache."""
        self.cache_engine = CacheEngine(self.model_config, self.cache_config, self.device,
                                        num_device_blocks, num_cpu_blocks)

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> bool:
        """Captures CUDA graphs of decode steps when the device and the model allow it;
        returns whether it did."""
        assert self.cache_engine is not None, "init_cache() must run before capturing"
        if self.device.type != "cuda" or not supports_graphs(self.model,
                                                             self.cache_config.block_size):
            return False
        self.runner.capture_decode_graphs(self.cache_engine.device_cache, max_num_seqs,
                                          max_model_len)
        return True

    def execute(self, groups: list[SequenceGroup], block_tables: dict[int, list[int]],
                blocks_to_swap_in: dict[int, int], blocks_to_swap_out: dict[int, int],
                blocks_to_copy: dict[int, list[int]]) -> list[GroupSampleResult]:
        """Applies the step's cache moves, then runs the model on ``groups``."""
        assert self.cache_engine is not None, "init_cache() must run before execute()"
        self.cache_engine.swap_in(blocks_to_swap_in)
        self.cache_engine.swap_out(blocks_to_swap_out)
        self.cache_engine.copy(blocks_to_copy)
        if not groups:
            return []
        return self.runner.execute(groups, block_tables, self.cache_engine.device_cache)
