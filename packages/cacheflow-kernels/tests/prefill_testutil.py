"""Inputs and the oracle for the paged_prefill_attention tests (GPU, CPU emulation, benchmark).

A case is a ragged batch: sequence i has ``q_lens[i]`` new tokens and ``ctx_lens[i]`` tokens in
all (``ctx_lens[i] - q_lens[i]`` of them cached before, e.g. a shared prefix or earlier chunks).
Its blocks are drawn at random from the pool (shuffled block tables); every cache slot that no
sequence owns holds NaN, so a kernel that reads outside the context, or through the wrong block,
returns NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ARG_ORDER = (
    "out", "query", "key_cache", "value_cache", "block_tables", "query_start_loc",
    "context_lens",
)


def make_case(
    q_lens: Sequence[int],
    ctx_lens: Sequence[int] | None = None,
    *,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_size: int = 64,
    block_size: int = 16,
    dtype: Any = None,
    device: str = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
    spare_table_cols: int = 1,
    num_blocks: int | None = None,
    max_blocks_per_seq: int | None = None,
) -> dict[str, Any]:
    """Random inputs of one call (and ``q_lens``/``ctx_lens`` as lists, ``scale``).

    Values are drawn on the CPU with a seeded generator (so a case is the same on any device)
    and moved to ``device``. ``out`` is filled with NaN. ``num_blocks`` and
    ``max_blocks_per_seq`` fix the cache and block-table shapes (for CUDA-graph replays); by
    default they are what the sequences need plus ``spare_blocks`` / ``spare_table_cols``.
    """
    import torch

    dtype = dtype or torch.float16
    num_kv_heads = num_kv_heads or num_heads
    q_lens = [int(q) for q in q_lens]
    ctx_lens = list(q_lens) if ctx_lens is None else [int(c) for c in ctx_lens]
    assert len(ctx_lens) == len(q_lens) and all(c >= q for q, c in zip(q_lens, ctx_lens))
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(q_lens)
    blocks_per_seq = [math.ceil(c / block_size) for c in ctx_lens]
    max_blocks = max(blocks_per_seq, default=0) + spare_table_cols
    if max_blocks_per_seq is not None:
        assert max_blocks_per_seq >= max(blocks_per_seq, default=0)
        max_blocks = max_blocks_per_seq
    if num_blocks is None:
        num_blocks = sum(blocks_per_seq) + spare_blocks
    assert num_blocks >= sum(blocks_per_seq)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(q_lens), max(max_blocks, 1), dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.full(shape, float("nan"), dtype=torch.float32)
    value_cache = torch.full(shape, float("nan"), dtype=torch.float32)
    used = 0
    for i, (nb, ctx) in enumerate(zip(blocks_per_seq, ctx_lens)):
        blocks = perm[used:used + nb]
        used += nb
        tables[i, :nb] = blocks.to(torch.int32)
        pos = torch.arange(ctx)
        b, off = blocks[pos // block_size], pos % block_size
        key_cache[b, off] = torch.randn(ctx, num_kv_heads, head_size, generator=gen)
        value_cache[b, off] = torch.randn(ctx, num_kv_heads, head_size, generator=gen)
    query = torch.randn(num_tokens, num_heads, head_size, generator=gen)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    case = {
        "out": torch.full((num_tokens, num_heads, head_size), float("nan")).to(dtype),
        "query": query.to(dtype),
        "key_cache": key_cache.to(dtype),
        "value_cache": value_cache.to(dtype),
        "block_tables": tables,
        "query_start_loc": torch.tensor(starts, dtype=torch.int32),
        "context_lens": torch.tensor(ctx_lens, dtype=torch.int32),
    }
    case = {k: v.to(device) for k, v in case.items()}
    case["q_lens"] = q_lens
    case["ctx_lens"] = ctx_lens
    case["scale"] = 1.0 / math.sqrt(head_size)
    return case


def call_args(case: dict[str, Any]) -> tuple[Any, ...]:
    """The tensor arguments of ``paged_prefill_attention`` in order."""
    return tuple(case[name] for name in ARG_ORDER)


def reference(case: dict[str, Any]) -> Any:
    """The runtime's reference backend (float32 math) on the case; [num_tokens, heads, d].

    ``case["sliding_window"]``, when present and not None, limits each query to its last W
    positions; ``case["logits_soft_cap"]`` soft-caps the scores; FP8 caches are dequantized
    with ``case["k_scale"]`` / ``case["v_scale"]``.
    """
    import torch

    from cacheflow_runtime.attention import reference as ref
    from cacheflow_runtime.attention.metadata import InputMetadata

    q_lens, ctx_lens = case["q_lens"], case["ctx_lens"]
    device = case["query"].device
    num_tokens = sum(q_lens)
    metadata = InputMetadata(
        query_lens=list(q_lens),
        context_lens_host=list(ctx_lens),
        query_start_loc=case["query_start_loc"],
        context_lens=case["context_lens"],
        block_tables=case["block_tables"],
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        logit_indices=torch.zeros(0, dtype=torch.int64, device=device),
        is_prompt=True,
    )
    if not q_lens:
        return case["query"].float().clone()
    kwargs: dict[str, Any] = {}
    if case.get("sliding_window") is not None:
        kwargs["sliding_window"] = case["sliding_window"]
    if case.get("logits_soft_cap") is not None:
        kwargs["logits_soft_cap"] = case["logits_soft_cap"]
    key_cache, value_cache = case["key_cache"], case["value_cache"]
    if key_cache.dtype == torch.float8_e4m3fn:  # the reference dequantizes FP8 itself
        kwargs["k_scale"] = case.get("k_scale", 1.0)
        kwargs["v_scale"] = case.get("v_scale", 1.0)
    else:
        key_cache, value_cache = key_cache.float(), value_cache.float()
    out = ref.paged_attention(case["query"].float(), key_cache, value_cache, metadata,
                              case["scale"], **kwargs)
    return out.float()


def tolerance(dtype: Any) -> float:
    """Bound on max |out - ref| / max |ref| per dtype (fp16/bf16 round P and the output)."""
    import torch

    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}[dtype]


def check_close(out: Any, ref: Any, dtype: Any, what: str = "") -> float:
    """Asserts every element was written (no NaN) and the relative error is within tolerance."""
    import torch

    out = out.float()
    assert not torch.isnan(out).any(), f"{what}: {int(torch.isnan(out).sum())} NaN outputs"
    scale = max(float(ref.abs().max()), 1e-6)
    err = float((out - ref).abs().max()) / scale
    assert err <= tolerance(dtype), f"{what}: max error {err:.3g} > {tolerance(dtype):.3g}"
    rel = float((out - ref).norm() / max(float(ref.norm()), 1e-12))
    assert rel <= tolerance(dtype) / 2, f"{what}: relative l2 error {rel:.3g}"
    return err


class FakeCuda:
    """A CPU tensor that reports a CUDA device through ``__dlpack_device__`` (kDLCUDA = 2)."""

    def __init__(self, tensor: Any, index: int = 0) -> None:
        self.tensor, self.index = tensor, index
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self.index)

    def is_contiguous(self) -> bool:
        return bool(self.tensor.is_contiguous())


def small_cpu_args(dtype: Any = None) -> dict[str, Any]:
    """A valid argument set on the CPU (valid except for the device): two sequences, GQA."""
    case = make_case([3, 2], [5, 2], num_heads=4, num_kv_heads=2, head_size=64, block_size=4,
                     dtype=dtype)
    return {name: case[name] for name in ARG_ORDER}
