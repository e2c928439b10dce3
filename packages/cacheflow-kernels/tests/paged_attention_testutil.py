"""Inputs and the float64 oracle of the paged_attention (decode) tests: GPU, CPU emulation and
the benchmark.

A case is a batch of sequences with one query token each; sequence ``s`` has ``ctx_lens[s]``
cached tokens (its own token last). Its blocks are drawn at random from the pool (shuffled,
non-contiguous block tables); every cache slot that no sequence owns holds NaN, and the unused
block-table entries point at such a block, so a kernel that reads outside the context, or
through the wrong block, returns NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

#: Positional order of the op's tensor arguments.
ARG_ORDER = ("out", "query", "key_cache", "value_cache", "block_tables", "context_lens")

#: Per-dtype limits of ||out - ref|| / ||ref|| and of the elementwise error (atol = rtol).
TOLERANCES = {"float32": (1e-5, 1e-4), "float16": (2e-3, 5e-3), "bfloat16": (1.2e-2, 3e-2)}


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi slopes of the paper (geometric, 2^(-8/n) ... for n heads, n a power of 2 or
    the interleaved extension otherwise)."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]


def make_case(
    ctx_lens: Sequence[int],
    *,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_size: int = 64,
    block_size: int = 16,
    dtype: Any = None,
    device: str = "cpu",
    seed: int = 0,
    alibi: bool = False,
    q_scale: float = 1.0,
    spare_blocks: int = 2,
    spare_table_cols: int = 1,
    num_blocks: int | None = None,
    max_blocks_per_seq: int | None = None,
) -> dict[str, Any]:
    """Random inputs of one call: the tensors of ARG_ORDER, ``alibi_slopes`` (or None),
    ``scale``, and ``ctx_lens`` as a list.

    Values are drawn with a seeded generator on ``device``. ``out`` is filled with NaN.
    ``num_blocks`` / ``max_blocks_per_seq`` fix the cache and block-table shapes (for CUDA-graph
    replays); by default they are what the sequences need plus ``spare_blocks`` /
    ``spare_table_cols``. ``q_scale`` multiplies the query (larger: peakier softmax).
    """
    import torch

    dtype = dtype or torch.float16
    num_kv_heads = num_kv_heads or num_heads
    ctx_lens = [int(c) for c in ctx_lens]
    num_seqs = len(ctx_lens)
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [math.ceil(c / block_size) for c in ctx_lens]
    needed = sum(blocks_per_seq)
    max_blocks = max(blocks_per_seq, default=0) + spare_table_cols
    if max_blocks_per_seq is not None:
        assert max_blocks_per_seq >= max(blocks_per_seq, default=0)
        max_blocks = max_blocks_per_seq
    if num_blocks is None:
        num_blocks = needed + spare_blocks
    assert num_blocks >= needed

    perm = torch.randperm(num_blocks, generator=gen, device=device)
    spare = int(perm[needed]) if num_blocks > needed else 0  # a block nobody owns: NaN
    tables = torch.full((num_seqs, max(max_blocks, 1)), spare, dtype=torch.int64)
    offset = 0
    owned = perm[:needed].cpu()
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = owned[offset:offset + n]
        offset += n
    tables = tables[:, :max_blocks].to(device)

    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    value_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    max_ctx = max(ctx_lens, default=0)
    if max_ctx:
        lens = torch.tensor(ctx_lens, device=device)
        pos = torch.arange(max_ctx, device=device)[None, :].expand(num_seqs, -1)
        valid = pos < lens[:, None]
        blocks = tables.gather(1, (pos // block_size).clamp(max=max_blocks - 1))
        slots = (blocks * block_size + pos % block_size)[valid]
        n = slots.numel()
        shape = (n, num_kv_heads, head_size)
        key_cache.view(-1, num_kv_heads, head_size)[slots] = torch.randn(
            shape, generator=gen, device=device).to(dtype)
        value_cache.view(-1, num_kv_heads, head_size)[slots] = torch.randn(
            shape, generator=gen, device=device).to(dtype)
    query = (torch.randn((num_seqs, num_heads, head_size), generator=gen, device=device)
             * q_scale).to(dtype)
    slopes = None
    if alibi:
        slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)
    return {
        "out": torch.full_like(query, float("nan")),
        "query": query,
        "key_cache": key_cache,
        "value_cache": value_cache,
        "block_tables": tables.to(torch.int32),
        "context_lens": torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        "alibi_slopes": slopes,
        "scale": head_size ** -0.5,
        "ctx_lens": ctx_lens,
    }


def quantize_fp8(cache: Any, scale: float) -> Any:
    """``cache / scale`` as FP8 E4M3 (torch.float8_e4m3fn, saturated to +-448; NaN stays NaN),
    what ``reshape_and_cache`` writes into an fp8 cache."""
    import torch

    # Divide by a float32 tensor: torch divides a CUDA tensor by a Python number through the
    # reciprocal, which rounds differently from the kernel's division now and then.
    divisor = torch.tensor(scale, dtype=torch.float32, device=cache.device)
    return (cache.float() / divisor).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def dequantize_fp8(cache: Any, scale: float) -> Any:
    """The float64 values an fp8 cache stands for: ``cache * scale``."""
    return cache.double() * scale


def _oracle_rows(
    query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any,
    scale: float, alibi_slopes: Any, sliding_window: int | None,
    logits_soft_cap: float | None,
) -> Iterator[tuple[int, Any, Any]]:
    """(sequence, float64 scores [num_heads, n], float64 values [n, num_heads, head_size]) of
    every sequence with a non-empty context, as the kernel forms them (``value_cache`` may be
    None: values then come back as None)."""
    import torch

    num_heads = query.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    limit = block_tables.shape[1] * block_size
    tables = block_tables.long()
    for s, n in enumerate(context_lens.tolist()):
        n = min(max(int(n), 0), limit)
        if n == 0:
            continue
        start = max(n - sliding_window, 0) if sliding_window else 0
        pos = torch.arange(start, n, device=query.device)
        blocks = tables[s, pos // block_size]
        k = key_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", query[s].double(), k) * scale
        if logits_soft_cap:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.double()[:, None] * (pos - (n - 1)).double()[None, :]
        v = None
        if value_cache is not None:
            v = value_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        yield s, scores, v


def oracle(
    query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any,
    scale: float, alibi_slopes: Any = None, sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> Any:
    """float64 decode attention (query = the last context token), on the inputs' device.

    Returns ``[num_seqs, num_heads, head_size]`` float64; zeros for an empty context. Contexts
    are clamped to ``max_blocks_per_seq * block_size`` like the kernel's. ``logits_soft_cap``
    caps the scaled scores (``cap * tanh(score / cap)``) before ALiBi. For an fp8 cache pass
    its :func:`dequantize_fp8` values.
    """
    import torch

    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    for s, scores, v in _oracle_rows(query, key_cache, value_cache, block_tables, context_lens,
                                     scale, alibi_slopes, sliding_window, logits_soft_cap):
        out[s] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
    return out


def oracle_lse(
    query: Any, key_cache: Any, block_tables: Any, context_lens: Any, scale: float,
    alibi_slopes: Any = None, sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> Any:
    """float64 ``log(sum(exp(score)))`` per (sequence, head) over the scores :func:`oracle`
    forms; ``-inf`` for an empty context. ``[num_seqs, num_heads]``."""
    import torch

    lse = torch.full(query.shape[:2], -math.inf, dtype=torch.float64, device=query.device)
    for s, scores, _ in _oracle_rows(query, key_cache, None, block_tables, context_lens, scale,
                                     alibi_slopes, sliding_window, logits_soft_cap):
        lse[s] = torch.logsumexp(scores, dim=-1)
    return lse


def errors(out: Any, ref: Any) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max |out - ref| / (1 + |ref|)) in float64; inf if out has NaN."""
    import torch

    out = out.double()
    if not torch.isfinite(out).all():
        return math.inf, math.inf
    diff = out - ref
    rel = float(diff.norm() / ref.norm().clamp_min(1e-30))
    elem = float((diff.abs() / (1 + ref.abs())).max()) if diff.numel() else 0.0
    return rel, elem


def assert_close(out: Any, ref: Any, dtype_name: str, what: str = "") -> None:
    """Every element written (finite) and within the dtype's tolerances of the oracle."""
    rel_tol, elem_tol = TOLERANCES[dtype_name]
    rel, elem = errors(out, ref)
    assert rel <= rel_tol and elem <= elem_tol, (
        f"{what}: relative error {rel:.3g} (limit {rel_tol}), elementwise {elem:.3g} "
        f"(limit {elem_tol})"
    )
