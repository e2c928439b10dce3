"""skinny_gemm on a CUDA device (compute capability 9.0+; skipped elsewhere) against a float64
reference: the 7B decode shapes, bias, strided rows, CUDA-graph replay, and the chain with the
kernel that writes x (the weight read starts before that kernel has finished)."""

from __future__ import annotations

from typing import Any

import pytest
from skinny_testutil import check
from skinny_testutil import inputs as cpu_inputs

import cacheflow_kernels as ck

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available()
                            and torch.cuda.get_device_capability() >= (9, 0)),
                       reason="skinny_gemm needs compute capability 9.0+"),
]


def inputs(m: int, n: int, k: int, dtype: Any, bias: bool, seed: int) -> tuple[Any, ...]:
    """The shared test inputs, on the GPU."""
    return cpu_inputs(m, n, k, dtype, bias, seed, device="cuda")


# LLaMA-2-7B's decode GEMMs (qkv, o, gate_up, down, lm_head) and a few odd shapes.
SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096),
          (5, 64), (1000, 16384), (777, 1536)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_matches_float64_reference(n: int, k: int, m: int, dtype: Any) -> None:
    x, w, b = inputs(m, n, k, dtype, bias=n % 2 == 1, seed=n + k + m)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    ck.skinny_gemm(out, x, w, b)
    torch.cuda.synchronize()
    check(out, x, w, b)


def test_strided_rows() -> None:
    x_full, w, b = inputs(2, 4096, 4096, torch.float16, True, seed=1)
    x_buf = torch.full((2, 4096 + 128), float("nan"), dtype=torch.float16, device="cuda")
    x_buf[:, :4096] = x_full
    out_buf = torch.full((2, 4096 + 8), float("nan"), dtype=torch.float16, device="cuda")
    ck.skinny_gemm(out_buf[:, :4096], x_buf[:, :4096], w, b)
    torch.cuda.synchronize()
    check(out_buf[:, :4096], x_full, w, b)
    assert torch.isnan(out_buf[:, 4096:]).all()


def test_graph_replay_after_the_kernel_that_writes_x() -> None:
    """rms_norm writes x, skinny_gemm reads it (launched with PDL: its weight copies start
    before rms_norm ends); replays with new inputs give the new results."""
    dtype = torch.bfloat16
    h, w, _ = inputs(1, 11008, 4096, dtype, False, seed=2)
    norm_w = torch.ones(4096, dtype=dtype, device="cuda")
    x = torch.empty_like(h)
    out = torch.empty(1, 11008, dtype=dtype, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ck.rms_norm(x, h, norm_w, 1e-6)
        ck.skinny_gemm(out, x, w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            ck.rms_norm(x, h, norm_w, 1e-6)
            ck.skinny_gemm(out, x, w)
    for seed in range(3):
        h.copy_(torch.randn(h.shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want_x = torch.empty_like(h)
        ck.rms_norm(want_x, h, norm_w, 1e-6)
        torch.cuda.synchronize()
        check(out, want_x, w, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2])
def test_silu_gated_x_equals_silu_and_mul_then_gemm(m: int, dtype: Any) -> None:
    """activation="silu": x = [gate | up] of LLaMA-7B's MLP; the result has the bits of
    silu_and_mul followed by the plain kernel (the same rounding of the activation)."""
    gen = torch.Generator().manual_seed(m)
    gate_up = (torch.randn(m, 2 * 11008, generator=gen) * 2).to(dtype).cuda()
    w = (torch.randn(4096, 11008, generator=gen) / 11008 ** 0.5).to(dtype).cuda()
    fused = torch.full((m, 4096), float("nan"), dtype=dtype, device="cuda")
    ck.skinny_gemm(fused, gate_up, w, activation="silu")
    act = torch.empty(m, 11008, dtype=dtype, device="cuda")
    ck.silu_and_mul(act, gate_up)
    plain = torch.empty_like(fused)
    ck.skinny_gemm(plain, act, w)
    torch.cuda.synchronize()
    assert torch.equal(fused, plain)
    check(fused, act, w, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(12288, 4096), (22016, 4096), (777, 1536)])
def test_rms_norm_of_x_equals_rms_norm_then_gemm(n: int, k: int, dtype: Any) -> None:
    """norm_weight: the product with rms_norm(x). The normalized x may differ from rms_norm's in
    a few elements by one rounding step (the squares are summed in another order), so the
    result is within a few of the dtype's rounding steps of rms_norm followed by the plain
    kernel, and within tolerance of float64."""
    gen = torch.Generator().manual_seed(n + k)
    x = (torch.randn(1, k, generator=gen) * 3).to(dtype).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    norm_w = (1 + torch.randn(k, generator=gen) / 4).to(dtype).cuda()
    fused = torch.full((1, n), float("nan"), dtype=dtype, device="cuda")
    ck.skinny_gemm(fused, x, w, norm_weight=norm_w, eps=1e-5)
    normed = torch.empty_like(x)
    ck.rms_norm(normed, x, norm_w, 1e-5)
    plain = torch.empty_like(fused)
    ck.skinny_gemm(plain, normed, w)
    torch.cuda.synchronize()
    check(fused, normed, w, None)
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    assert float((fused.float() - plain.float()).abs().max()) <= 4 * ulp * float(
        plain.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_equals_fused_add(dtype: Any) -> None:
    """residual (in place, as a layer's o and down projections use it): the bits of the plain
    product rounded to the dtype, added to the residual in float32 and rounded again."""
    x, w, b = inputs(1, 4096, 11008, dtype, True, seed=4)
    residual = torch.randn(1, 4096, generator=torch.Generator().manual_seed(3)).to(dtype).cuda()
    plain = torch.empty_like(residual)
    ck.skinny_gemm(plain, x, w, b)
    want = (plain.float() + residual.float()).to(dtype)
    ck.skinny_gemm(residual, x, w, b, residual=residual)
    torch.cuda.synchronize()
    assert torch.equal(residual, want)
