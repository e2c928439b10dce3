"""moe_grouped_gemm on a CUDA device against torch matmuls per expert segment (float32
accumulation, rounded once). Skipped without CUDA."""

from __future__ import annotations

from typing import Any

import pytest

import cacheflow_kernels as ck

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


def _segments(counts: list[int]) -> Any:
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return torch.tensor(offsets, dtype=torch.int64, device="cuda")


def _reference(x: Any, w: Any, offsets: list[int]) -> Any:
    out = torch.empty(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w.shape[0]):
        b, t = offsets[e], offsets[e + 1]
        out[b:t] = x[b:t].float() @ w[e].float().t()
    return out


# (rows per expert, out_features, in_features): empty experts, segments shorter and longer than
# a 128-row tile and not multiples of it, N not a multiple of the 128-column tile nor of 8, K a
# multiple of 8 but not of the 32-element step, one expert, many experts, Mixtral-like sizes.
CASES = [
    ([5, 0, 130, 1], 96, 64),
    ([0, 0, 3], 10, 8),
    ([300], 200, 40),
    ([17] * 16, 136, 72),
    ([129, 255, 0, 64, 1, 1, 500, 7], 264, 520),
    ([1024] * 8, 1024, 512),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_moe_grouped_gemm_matches_torch(case: int, dtype: Any) -> None:
    counts, n, k = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(case)
    m = sum(counts)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(len(counts), n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    offsets = _segments(counts)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # poisoned
    ck.moe_grouped_gemm(out, x, w, offsets)
    torch.cuda.synchronize()
    ref = _reference(x, w, offsets.tolist())
    assert not out.isnan().any()
    # float32 accumulation in both; the output rounding of the dtype dominates.
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_rows_past_the_last_segment_are_untouched() -> None:
    x = torch.randn(40, 16, device="cuda", dtype=torch.float16)
    w = torch.randn(2, 24, 16, device="cuda", dtype=torch.float16)
    out = torch.full((40, 24), 7.0, dtype=torch.float16, device="cuda")
    ck.moe_grouped_gemm(out, x, w, _segments([10, 20]))
    torch.cuda.synchronize()
    assert torch.equal(out[30:], torch.full((10, 24), 7.0, dtype=torch.float16, device="cuda"))
    ref = _reference(x, w, [0, 10, 30])
    torch.testing.assert_close(out[:30].float(), ref[:30], atol=4e-3, rtol=4e-3)


def test_capturable_in_a_cuda_graph() -> None:
    x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3, 48, 32, device="cuda", dtype=torch.bfloat16)
    offsets = _segments([20, 0, 44])
    out = torch.empty(64, 48, device="cuda", dtype=torch.bfloat16)
    ck.moe_grouped_gemm(out, x, w, offsets)  # loads the library and warms up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.moe_grouped_gemm(out, x, w, offsets)
    offsets.copy_(_segments([0, 64, 0]))  # new routing, same shapes: replay reads it
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
        ck.moe_grouped_gemm(out, x, w, _segments([4, 4]))
