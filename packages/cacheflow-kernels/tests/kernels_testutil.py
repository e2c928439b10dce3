"""Helpers shared by the cacheflow-kernels tests."""

from __future__ import annotations

from typing import Any


def make_args(
    dtype: Any = None,
    num_tokens: int = 5,
    num_heads: int = 2,
    head_size: int = 8,
    num_blocks: int = 4,
    block_size: int = 3,
    device: str = "cpu",
) -> dict[str, Any]:
    """A valid argument set of reshape_and_cache (random data, distinct slots, one padding)."""
    import torch

    dtype = dtype or torch.float16
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(num_tokens, num_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_heads, head_size, generator=gen).to(dtype)
    cache_shape = (num_blocks, block_size, num_heads, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    if num_tokens:
        slots[-1] = -1
    args = {
        "key": key,
        "value": value,
        "key_cache": torch.full(cache_shape, float("nan"), dtype=dtype),
        "value_cache": torch.full(cache_shape, float("nan"), dtype=dtype),
        "slot_mapping": slots.to(torch.int64),
    }
    return {k: v.to(device) for k, v in args.items()}
