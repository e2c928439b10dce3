"""CacheEngine: the paged KV cache tensors of every layer, on the device and in host swap space."""

from __future__ import annotations

import torch

from cacheflow_runtime.config import CacheConfig, ModelConfig, kv_cache_torch_dtype
from cacheflow_runtime.kernels import cache_kernels_for

KVCache = tuple[torch.Tensor, torch.Tensor]


def block_bytes(model_config: ModelConfig, block_size: int, tp_size: int = 1,
                cache_dtype: str = "auto") -> int:
    """Bytes one KV block takes over all layers (keys and values) on one rank, with elements of
    the KV-cache dtype (``cache_dtype`` "fp8": one byte each)."""
    kv_heads = max(1, model_config.num_kv_heads // tp_size)
    elem = torch.empty((), dtype=kv_cache_torch_dtype(cache_dtype, model_config.dtype)
                       ).element_size()
    return 2 * model_config.num_layers * block_size * kv_heads * model_config.head_size * elem


class CacheEngine:
    """Holds per-layer (key_cache, value_cache) of shape
    [num_blocks, block_size, num_kv_heads, head_size] on the device and on the host, and moves
    blocks between them (swap) and within the device (copy-on-write). The element dtype is the
    model's, or ``torch.float8_e4m3fn`` with ``cache_config.cache_dtype == "fp8"``.

    On CUDA the moves are the kernels of cacheflow-kernels, queued on the current stream without
    a host synchronization: ``copy_blocks`` (every layer in one launch) and ``swap_blocks``
    (pinned host cache, one copy kernel per layer and direction); on the CPU, torch indexing.
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 device: torch.device, num_device_blocks: int, num_cpu_blocks: int,
                 tp_size: int = 1) -> None:
        self.device = device
        self.block_size = cache_config.block_size
        self.num_device_blocks = num_device_blocks
        self.num_cpu_blocks = num_cpu_blocks
        kv_heads = max(1, model_config.num_kv_heads // tp_size)
        shape = (self.block_size, kv_heads, model_config.head_size)
        dtype = kv_cache_torch_dtype(cache_config.cache_dtype, model_config.dtype)
        self.dtype = dtype
        pin = device.type == "cuda"
        self.device_cache: list[KVCache] = [
            (torch.empty((num_device_blocks, *shape), dtype=dtype, device=device),
             torch.empty((num_device_blocks, *shape), dtype=dtype, device=device))
            for _ in range(model_config.num_layers)]
        self.cpu_cache: list[KVCache] = [
            (torch.empty((num_cpu_blocks, *shape), dtype=dtype, pin_memory=pin),
             torch.empty((num_cpu_blocks, *shape), dtype=dtype, pin_memory=pin))
            for _ in range(model_config.num_layers)]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copies host blocks into device blocks ((cpu block, device block) pairs)."""
        self._move(self.cpu_cache, self.device_cache, pairs)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks out to host blocks ((device block, cpu block) pairs)."""
        self._move(self.device_cache, self.cpu_cache, pairs)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks to other device blocks in every layer ((source, destination)
        pairs; copy-on-write). The indices go over without a blocking copy, which would wait for
        the step still running on the device."""
        if not pairs or not self.device_cache:
            return
        ck = cache_kernels_for(self.device_cache[0][0])
        if ck is not None:
            mapping = torch.tensor(pairs, dtype=torch.int64).to(self.device, non_blocking=True)
            ck.copy_blocks([k for k, _ in self.device_cache], [v for _, v in self.device_cache],
                           mapping)
            return
        src_idx = torch.tensor([s for s, _ in pairs]).to(self.device, non_blocking=True)
        dst_idx = torch.tensor([d for _, d in pairs]).to(self.device, non_blocking=True)
        for key_cache, value_cache in self.device_cache:
            key_cache[dst_idx] = key_cache[src_idx]
            value_cache[dst_idx] = value_cache[src_idx]

    def _move(self, src_cache: list[KVCache], dst_cache: list[KVCache],
              pairs: list[tuple[int, int]]) -> None:
        if not pairs or not self.device_cache:
            return
        ck = cache_kernels_for(self.device_cache[0][0])
        if ck is not None and self.cpu_cache[0][0].is_pinned():
            mapping = torch.tensor(pairs, dtype=torch.int64)
            for (src_k, src_v), (dst_k, dst_v) in zip(src_cache, dst_cache):
                ck.swap_blocks(src_k, dst_k, mapping)
                ck.swap_blocks(src_v, dst_v, mapping)
            return
        for (src_k, src_v), (dst_k, dst_v) in zip(src_cache, dst_cache):
            src_idx = torch.tensor([s for s, _ in pairs], device=src_k.device)
            dst_idx = torch.tensor([d for _, d in pairs], device=dst_k.device)
            # Asynchronous only towards a device: a copy to the host must have landed before
            # the host-side indexing reads it.
            dst_k[dst_idx] = src_k[src_idx].to(dst_k.device, non_blocking=dst_k.is_cuda)
            dst_v[dst_idx] = src_v[src_idx].to(dst_v.device, non_blocking=dst_v.is_cuda)
