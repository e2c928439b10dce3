"""skinny_gemm's kernel runs on the CPU under a host emulation of its primitives
(tests/emulation/skinny_emu.h: TMA bulk copies completing on mbarriers, shuffles, barriers),
against a float64 reference.

The kernel source is compiled unchanged with g++; shared memory starts as NaN bytes and ``out``
as NaN, so a row read before its copy completed, a stage reused too early or an output row never
written shows up. The row split, the stage ring and the per-warp K slices are what this checks;
the hardware and the speed are the GPU tests' and the benchmark's job.
"""

from __future__ import annotations

import ctypes
from typing import Any

import emulator_builds
import pytest
from skinny_testutil import check, inputs

torch = pytest.importorskip("torch")

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


# Started as collection ends (conftest.py).
EMULATOR_BUILDS = [("skinny_emu.cc", "-DCACHEFLOW_PREFILL_EMULATE",
                    "-DCACHEFLOW_SKINNY_EMULATE")]


@pytest.fixture(scope="module")
def emu() -> Any:
    lib_path = emulator_builds.library(EMULATOR_BUILDS[0])
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.cf_emu_skinny_gemm
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
                   + [ctypes.c_int64] * 2 + [ctypes.c_int] * 4
                   + [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64])
    plan = lib.cf_emu_skinny_plan
    plan.restype = None
    plan.argtypes = [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_int)]
    fn.plan = plan
    return fn


MAX_STAGES = 8  # skinny::kMaxStages (the op's default cap is 4: CACHEFLOW_SKINNY_STAGES)


def run(emu: Any, out: Any, x: Any, w: Any, bias: Any, sms: int = 3,
        smem_per_sm: int = 228 * 1024, silu_gated: bool = False,
        max_stages: int = MAX_STAGES, norm_weight: Any = None, eps: float = 1e-6,
        residual: Any = None) -> int:
    return emu(DTYPE_CODES[x.dtype], out.data_ptr(), x.data_ptr(), w.data_ptr(),
               None if bias is None else bias.data_ptr(), x.shape[0], w.shape[0], w.shape[1],
               x.stride(0), out.stride(0), sms, smem_per_sm, int(silu_gated), max_stages,
               None if norm_weight is None else norm_weight.data_ptr(), eps,
               None if residual is None else residual.data_ptr(),
               0 if residual is None else residual.stride(0))


def plan_of(emu: Any, n: int, k: int, sms: int, smem_per_sm: int,
            max_stages: int = MAX_STAGES) -> dict[str, int]:
    """PlanSkinny's choice for W of shape [n, k] on a device of `sms` SMs."""
    got = (ctypes.c_int * 5)()
    emu.plan(n, k, sms, smem_per_sm, max_stages, got)
    return dict(zip(("grid", "rows_per_cta", "rows_per_stage", "stages", "smem_bytes"), got))


# (m, n, k, bias): one or two rows; rows per stage 16 (k 512) down to 1 (k 11008, 16384); n
# smaller than the grid, n not a multiple of the rows per stage or per CTA.
CASES = [
    (1, 100, 512, False),
    (2, 37, 1024, True),
    (1, 300, 4096, False),
    (2, 61, 4096, True),
    (1, 20, 11008, True),
    (2, 9, 16384, False),
    (1, 5, 64, True),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k", "bias"), CASES)
def test_matches_float64_reference(emu: Any, m: int, n: int, k: int, bias: bool,
                                   dtype: Any) -> None:
    x, w, b = inputs(m, n, k, dtype, bias, seed=n + k + m)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    assert run(emu, out, x, w, b) > 0
    check(out, x, w, b)


def test_strided_rows_of_x_and_out(emu: Any) -> None:
    """Rows of x and out inside wider buffers (e.g. a slice of a fused projection)."""
    x_full, w, b = inputs(2, 50, 1024, torch.float16, True, seed=7)
    x_buf = torch.full((2, 1024 + 64), float("nan"), dtype=torch.float16)
    x_buf[:, :1024] = x_full
    out_buf = torch.full((2, 50 + 14), float("nan"), dtype=torch.float16)
    x, out = x_buf[:, :1024], out_buf[:, :50]
    assert run(emu, out, x, w, b) > 0
    check(out, x_full, w, b)
    assert torch.isnan(out_buf[:, 50:]).all()  # nothing written past the rows


@pytest.mark.parametrize("max_stages", [2, 3, 5])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 300, 4096), (2, 23, 11008)])
def test_every_ring_depth(emu: Any, m: int, n: int, k: int, max_stages: int) -> None:
    """Rings of 2, 3 and 5 stages wrap several times over a CTA's rows (mbarrier phases and slot
    reuse); the result is the same at every depth."""
    x, w, b = inputs(m, n, k, torch.float16, True, seed=max_stages + n)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    assert run(emu, out, x, w, b, sms=2, max_stages=max_stages) > 0
    check(out, x, w, b)
    deepest = torch.full((m, n), float("nan"), dtype=torch.float16)
    assert run(emu, deepest, x, w, b, sms=2) > 0
    assert torch.equal(out, deepest)


def test_plan_takes_the_deepest_ring_that_fits(emu: Any) -> None:
    """132 SMs of 228 KB (H100/H200): two CTAs per SM, each with as many stages as half the SM's
    shared memory holds after the driver's 1 KB and the row partials, capped at max_stages."""
    sm = 228 * 1024
    # qkv of a 7B model: rows of 8 KB, two per stage; 47 rows per CTA -> 262 CTAs, partials
    # (47 + 1 for the norm's sums) * 8 warps * 2 rows * 4 B = 3,072 B;
    # (116,736 - 1,024 - 3,072) // (16,384 + 8) = 6.
    assert plan_of(emu, 12288, 4096, 132, sm) == {
        "grid": 262, "rows_per_cta": 47, "rows_per_stage": 2, "stages": 6,
        "smem_bytes": 6 * 16384 + 6 * 8 + 3072}
    # down: one 22,016-byte row per stage; 16 rows per CTA -> (115,712 - 1,088) // 22,024 = 5.
    assert plan_of(emu, 4096, 11008, 132, sm)["stages"] == 5
    assert plan_of(emu, 4096, 11008, 132, sm, max_stages=4)["stages"] == 4
    assert plan_of(emu, 12288, 4096, 132, sm, max_stages=3)["smem_bytes"] == 3 * 16392 + 3072
    # 96 KB per SM: two CTAs do not get two stages of 32 KB rows each, one CTA does
    # ((98,304 - 1,024 - 251 * 64) // 32,776 = 2).
    one = plan_of(emu, 1000, 16384, 4, 96 * 1024)
    assert (one["grid"], one["rows_per_cta"], one["stages"]) == (4, 250, 2)
    # 64 KB per SM: not even one CTA gets two stages: grid 0 (the op then rejects the shape).
    assert plan_of(emu, 1000, 16384, 4, 64 * 1024)["grid"] == 0


def test_one_wave_of_evenly_split_rows(emu: Any) -> None:
    """The plan gives every SM the same number of CTAs and every CTA the same rows (+-1), so a
    device of 5 SMs with room for two rings of at least two stages each runs 10 CTAs."""
    x, w, b = inputs(1, 1000, 4096, torch.bfloat16, False, seed=3)
    out = torch.full((1, 1000), float("nan"), dtype=torch.bfloat16)
    assert run(emu, out, x, w, b, sms=5) == 10
    check(out, x, w, b)


def silu_and_mul_like_the_kernel(x: Any) -> Any:
    """silu(gate) * up rounded as the silu_and_mul kernel rounds it: the activation to the dtype,
    then the float32 product to the dtype."""
    k = x.shape[1] // 2
    gate, up = x[:, :k].float(), x[:, k:].float()
    act = (gate / (1 + torch.exp(-gate))).to(x.dtype).float()
    return (act * up).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 70, 1024), (2, 33, 11008), (1, 9, 64)])
def test_silu_gated_x(emu: Any, m: int, n: int, k: int, dtype: Any) -> None:
    """x = [gate | up]: the product with silu(gate) * up, equal to the unfused pair's result."""
    gen = torch.Generator().manual_seed(n + k)
    x = (torch.randn(m, 2 * k, generator=gen) * 2).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    assert run(emu, out, x, w, None, silu_gated=True) > 0
    act = silu_and_mul_like_the_kernel(x)
    check(out, act, w, None)
    plain = torch.full((m, n), float("nan"), dtype=dtype)
    assert run(emu, plain, act, w, None) > 0
    assert torch.equal(out, plain)  # the same x in registers, the same sums


def rms_norm_like_the_kernel(x: Any, weight: Any, eps: float) -> Any:
    """rms_norm as the rms_norm kernel rounds it: x * rsqrt(mean(x^2) + eps) to the dtype, then
    the float32 product with the weight to the dtype (sum of squares in float64 here)."""
    xf = x.float()
    inv = torch.rsqrt(xf.double().pow(2).mean(dim=1, keepdim=True) + eps).float()
    return ((xf * inv).to(x.dtype).float() * weight.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 300, 4096), (2, 37, 1024), (1, 9, 64)])
def test_rms_norm_of_x(emu: Any, m: int, n: int, k: int, dtype: Any) -> None:
    """norm_weight: the product is with rms_norm(x); the normalized x differs from rms_norm's at
    most by one rounding step in a few elements (another summation order of the squares), so
    the result is checked against the float64 product of that x, and it must differ from the
    plain product (the norm was applied)."""
    gen = torch.Generator().manual_seed(n + k + m)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    norm_w = (1 + torch.randn(k, generator=gen) / 4).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    assert run(emu, out, x, w, None, norm_weight=norm_w, eps=1e-5) > 0
    normed = rms_norm_like_the_kernel(x, norm_w, 1e-5)
    check(out, normed, w, None)
    plain = torch.full((m, n), float("nan"), dtype=dtype)
    assert run(emu, plain, normed, w, None) > 0
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    assert (out.float() - plain.float()).abs().max() <= 4 * ulp * plain.float().abs().max()
    assert not torch.allclose(out.float(), (x.float() @ w.float().T), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
def test_residual_added_like_fused_add_rms_norm(emu: Any, dtype: Any, in_place: bool) -> None:
    """residual: out = residual + (x W^T + b), bit for bit the plain product rounded to the
    dtype and then added in float32 and rounded again, also when out is residual itself."""
    x, w, b = inputs(2, 77, 1024, dtype, True, seed=5)
    gen = torch.Generator().manual_seed(9)
    residual = (torch.randn(2, 77, generator=gen) * 4).to(dtype)
    plain = torch.full((2, 77), float("nan"), dtype=dtype)
    assert run(emu, plain, x, w, b) > 0
    want = (plain.float() + residual.float()).to(dtype)
    if in_place:
        out = residual.clone()
        assert run(emu, out, x, w, b, residual=out) > 0
    else:
        out = torch.full((2, 77), float("nan"), dtype=dtype)
        assert run(emu, out, x, w, b, residual=residual) > 0
    assert torch.equal(out, want)


def test_rms_norm_and_residual_together(emu: Any) -> None:
    """Both at once (not a layer's pattern, but nothing forbids it): the normalized product
    plus the residual."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 512, generator=gen).half()
    w = (torch.randn(40, 512, generator=gen) / 512 ** 0.5).half()
    norm_w = torch.ones(512).half()
    residual = torch.randn(1, 40, generator=gen).half()
    normed_only = torch.full((1, 40), float("nan"), dtype=torch.float16)
    assert run(emu, normed_only, x, w, None, norm_weight=norm_w) > 0
    both = torch.full((1, 40), float("nan"), dtype=torch.float16)
    assert run(emu, both, x, w, None, norm_weight=norm_w, residual=residual) > 0
    assert torch.equal(both, (normed_only.float() + residual.float()).half())
