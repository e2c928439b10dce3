"""moe_grouped_gemm on a CUDA device against torch matmuls per expert segment (float32
accumulation, rounded once). Skipped without CUDA.

Every kernel the library can run is tested in one process: CACHEFLOW_MOE_GEMM is read at each
call, so the tests set it (``auto``: the shape-based choice; ``wmma``: the original kernel; a
tile name: that mma.sync tile)."""

from __future__ import annotations

import os
from typing import Any

import pytest

import cacheflow_kernels as ck

from moe_testutil import VARIANTS, segment_offsets

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


def _reference(x: Any, w: Any, offsets: list[int]) -> Any:
    out = torch.empty(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w.shape[0]):
        b, t = offsets[e], offsets[e + 1]
        out[b:t] = x[b:t].float() @ w[e].float().t()
    return out


# Segments around every tile height (32, 64, 128 rows): 0, 1, 15, 17, 63, 65, 127, 129.
EDGE_COUNTS = [0, 1, 15, 17, 63, 65, 127, 129]

# (rows per expert, out_features, in_features): empty experts, segments shorter and longer than
# the 32/64/128-row tiles and not multiples of them, N at and off the 128/256-column tiles and
# not a multiple of 8, K a multiple of 8 at and off the 32/64-element steps (fewer K steps than
# pipeline stages, and many), one expert, many experts (> 32: the tile lookup's warp scan
# wraps), decode-sized and Mixtral-like sizes.
CASES = [
    ([5, 0, 130, 1], 96, 64),
    ([0, 0, 3], 10, 8),
    ([300], 200, 40),
    ([17] * 16, 136, 72),
    ([129, 255, 0, 64, 1, 1, 500, 7], 264, 520),
    ([1024] * 8, 1024, 512),
    (EDGE_COUNTS, 256, 64),
    (EDGE_COUNTS, 264, 520),
    (EDGE_COUNTS[::-1], 512, 72),
    (EDGE_COUNTS, 10, 136),
    ([2, 0, 1, 3] * 10, 384, 256),
    ([16] * 8, 1536, 1024),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_moe_grouped_gemm_matches_torch(case: int, dtype: Any, moe_gemm_variant: str) -> None:
    counts, n, k = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(case)
    m = sum(counts)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(len(counts), n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    offsets = segment_offsets(counts)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # poisoned
    ck.moe_grouped_gemm(out, x, w, offsets)
    torch.cuda.synchronize()
    ref = _reference(x, w, offsets.tolist())
    assert not out.isnan().any()
    # float32 accumulation in both; the output rounding of the dtype dominates.
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_rows_past_the_last_segment_are_untouched(moe_gemm_variant: str) -> None:
    x = torch.randn(40, 16, device="cuda", dtype=torch.float16)
    w = torch.randn(2, 24, 16, device="cuda", dtype=torch.float16)
    out = torch.full((40, 24), 7.0, dtype=torch.float16, device="cuda")
    ck.moe_grouped_gemm(out, x, w, segment_offsets([10, 20]))
    torch.cuda.synchronize()
    assert torch.equal(out[30:], torch.full((10, 24), 7.0, dtype=torch.float16, device="cuda"))
    ref = _reference(x, w, [0, 10, 30])
    torch.testing.assert_close(out[:30].float(), ref[:30], atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_past_the_last_segment_are_untouched_large(moe_gemm_variant: str, dtype: Any) -> None:
    """Tiles of every height end inside x: rows past offsets[E] (also inside a tile) stay."""
    counts = [63, 129, 1, 0, 17]
    m, n, k = sum(counts) + 70, 264, 136
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(len(counts), n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    out = torch.full((m, n), 7.0, dtype=dtype, device="cuda")
    ck.moe_grouped_gemm(out, x, w, segment_offsets(counts))
    torch.cuda.synchronize()
    t = sum(counts)
    assert torch.equal(out[t:], torch.full((m - t, n), 7.0, dtype=dtype, device="cuda"))
    offsets = segment_offsets(counts).tolist()
    ref = _reference(x[:t], w, offsets)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out[:t].float(), ref, atol=tol, rtol=tol)


def test_out_of_range_offsets_are_clamped(moe_gemm_variant: str) -> None:
    """Offsets are clamped to [0, num_rows] (a negative first one, a last one past the end)."""
    x = torch.randn(50, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3, 40, 32, device="cuda", dtype=torch.bfloat16) / 6
    out = torch.full((50, 40), 3.0, dtype=torch.bfloat16, device="cuda")
    offsets = torch.tensor([-5, 30, 30, 90], dtype=torch.int64, device="cuda")
    ck.moe_grouped_gemm(out, x, w, offsets)
    torch.cuda.synchronize()
    ref = _reference(x, w, [0, 30, 30, 50])
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_variants_agree_bitwise_on_exact_inputs() -> None:
    """Small-integer inputs make every product and float32 sum exact: all kernels must agree
    bit for bit, whatever their tiling and summation order."""
    counts = [0, 1, 15, 17, 63, 65, 127, 129]
    m, n, k = sum(counts), 264, 520
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randint(-3, 4, (m, k), generator=gen, device="cuda").to(torch.bfloat16)
    w = torch.randint(-3, 4, (len(counts), n, k), generator=gen, device="cuda").to(torch.bfloat16)
    offsets = segment_offsets(counts)
    ref = _reference(x, w, offsets.tolist()).to(torch.bfloat16)
    old = os.environ.get("CACHEFLOW_MOE_GEMM")
    try:
        for v in VARIANTS:
            os.environ["CACHEFLOW_MOE_GEMM"] = v
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            ck.moe_grouped_gemm(out, x, w, offsets)
            torch.cuda.synchronize()
            assert torch.equal(out, ref), v
    finally:
        if old is None:
            os.environ.pop("CACHEFLOW_MOE_GEMM", None)
        else:
            os.environ["CACHEFLOW_MOE_GEMM"] = old


def test_capturable_in_a_cuda_graph(moe_gemm_variant: str) -> None:
    x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3, 48, 32, device="cuda", dtype=torch.bfloat16)
    offsets = segment_offsets([20, 0, 44])
    out = torch.empty(64, 48, device="cuda", dtype=torch.bfloat16)
    ck.moe_grouped_gemm(out, x, w, offsets)  # loads the library and warms up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.moe_grouped_gemm(out, x, w, offsets)
    offsets.copy_(segment_offsets([0, 64, 0]))  # new routing, same shapes: replay reads it
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = x.float() @ w[1].float().t()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=2e-2)


def test_library_checks_reach_python_as_value_error() -> None:
    x = torch.randn(8, 12, device="cuda", dtype=torch.float16)  # in_features not a multiple of 8
    w = torch.randn(2, 16, 12, device="cuda", dtype=torch.float16)
    out = torch.empty(8, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 8"):
        ck.moe_grouped_gemm(out, x, w, segment_offsets([4, 4]))
