"""Which GEMMs the linear layers send to cacheflow_kernels.skinny_gemm (one row on
Hopper unless CACHEFLOW_SKINNY_GEMM=0) and that the result is F.linear's. The CPU tests pin the
fallback; the GPU ones (compute capability 9.0+) the kernel path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import cacheflow_kernels
from cacheflow_runtime.kernels import skinny_gemm_applies
from cacheflow_runtime.layers import linear as linear_layers
from cacheflow_runtime.layers.activation import SiluAndMul
from cacheflow_runtime.layers.layernorm import GemmaRMSNorm, RMSNorm
from cacheflow_runtime.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    linear,
    stream_fusion_applies,
)


def test_cpu_rows_stay_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEFLOW_SKINNY_GEMM", "1")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, generator=gen)
    w = torch.randn(64, 128, generator=gen)
    b = torch.randn(64, generator=gen)
    assert not skinny_gemm_applies(x, w)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))


hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
    reason="skinny_gemm runs on compute capability 9.0+")


@pytest.fixture
def skinny_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of x of every skinny_gemm call."""
    seen: list[int] = []
    original = cacheflow_kernels.skinny_gemm

    def counted(out: Any, x: Any, weight: Any, bias: Any = None, activation: Any = None,
                **fused: Any) -> None:
        seen.append(x.shape[0])
        original(out, x, weight, bias, activation, **fused)

    monkeypatch.setattr(cacheflow_kernels, "skinny_gemm", counted)
    return seen


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_row_takes_the_kernel(monkeypatch: pytest.MonkeyPatch,
                                          skinny_calls: list[int], dtype: Any) -> None:
    monkeypatch.setenv("CACHEFLOW_SKINNY_GEMM", "1")
    layer = ReplicatedLinear(4096, 1000, bias=True, params_dtype=dtype).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer.weight.data.normal_(0, 0.02, generator=gen)
    layer.bias.data.normal_(0, 1, generator=gen)
    for rows in (1, 2, 3):
        x = torch.randn(rows, 4096, device="cuda", dtype=dtype, generator=gen)
        got = layer(x)
        want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    assert skinny_calls == [1]  # two and three rows stay on cuBLAS


@pytest.mark.gpu
@hopper
def test_on_by_default(monkeypatch: pytest.MonkeyPatch, skinny_calls: list[int]) -> None:
    monkeypatch.delenv("CACHEFLOW_SKINNY_GEMM", raising=False)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    w = torch.randn(512, 4096, device="cuda", dtype=torch.float16)
    assert skinny_gemm_applies(x, w)
    linear(x, w)
    assert skinny_calls == [1]


@pytest.mark.gpu
@hopper
def test_off_with_the_switch_at_zero(monkeypatch: pytest.MonkeyPatch,
                                     skinny_calls: list[int]) -> None:
    monkeypatch.setenv("CACHEFLOW_SKINNY_GEMM", "0")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    w = torch.randn(512, 4096, device="cuda", dtype=torch.float16)
    assert not skinny_gemm_applies(x, w)
    linear(x, w)
    assert skinny_calls == []


def test_gated_down_projection_on_cpu_is_the_two_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from cacheflow_runtime.layers.activation import SiluAndMul
    from cacheflow_runtime.layers.linear import RowParallelLinear

    monkeypatch.setenv("CACHEFLOW_SKINNY_GEMM", "1")
    down = RowParallelLinear(128, 64, bias=True, params_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    down.weight.data.normal_(generator=gen)
    down.bias.data.normal_(generator=gen)
    gate_up = torch.randn(2, 256, generator=gen)
    act = SiluAndMul()
    assert torch.equal(down.forward_gated(gate_up, act), down(act(gate_up)))


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gated_down_projection_fuses_the_silu(monkeypatch: pytest.MonkeyPatch,
                                              skinny_calls: list[int], dtype: Any) -> None:
    """One row: one skinny_gemm call with the SiLU inside, the same bits as the two ops
    (silu_and_mul's rounding, then the GEMM of skinny_gemm); two or three rows: cuBLAS."""
    from cacheflow_runtime.layers.activation import SiluAndMul
    from cacheflow_runtime.layers.linear import RowParallelLinear

    monkeypatch.setenv("CACHEFLOW_SKINNY_GEMM", "1")
    down = RowParallelLinear(11008, 4096, bias=False, params_dtype=dtype).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    down.weight.data.normal_(0, 0.02, generator=gen)
    act = SiluAndMul()
    for rows in (1, 2, 3):
        gate_up = torch.randn(rows, 2 * 11008, device="cuda", dtype=dtype, generator=gen) * 2
        got = down.forward_gated(gate_up, act)
        if rows == 1:
            want = torch.empty_like(got)
            cacheflow_kernels.skinny_gemm(want, act(gate_up), down.weight)
            assert torch.equal(got, want)
        ref = F.linear(act(gate_up).float(), down.weight.float())
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    assert skinny_calls == [1, 1]  # the fused call, then the unfused comparison


def _filled(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return layer


def test_cpu_fallbacks_are_the_unfused_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel does not apply (CPU), forward_normed is forward(norm(x)) and the residual
    forms add forward's result to the residual, for any number of rows."""
    monkeypatch.setenv("CACHEFLOW_SKINNY_FUSE", "1")
    col = _filled(ColumnParallelLinear(64, 96, bias=True), 1)
    row = _filled(RowParallelLinear(64, 32, bias=False), 2)
    norm = _filled(RMSNorm(64, 1e-5), 3)
    gen = torch.Generator().manual_seed(4)
    for rows in (1, 3):
        x = torch.randn(rows, 64, generator=gen)
        residual = torch.randn(rows, 32, generator=gen)
        gate_up = torch.randn(rows, 128, generator=gen)
        assert not stream_fusion_applies(x, col.weight)
        assert torch.equal(col.forward_normed(x, norm), col(norm(x)))
        assert torch.equal(row.forward_residual(x, residual.clone()), residual + row(x))
        assert torch.equal(row.forward_gated_residual(gate_up, SiluAndMul(), residual.clone()),
                           residual + row.forward_gated(gate_up, SiluAndMul()))


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """skinny_gemm taking every one-row call on CPU; records each call's options."""
    calls: list[dict[str, Any]] = []

    def fake(out: Any, x: Any, weight: Any, bias: Any = None, activation: Any = None,
             norm_weight: Any = None, eps: float = 1e-6, residual: Any = None) -> None:
        calls.append({"norm_weight": norm_weight, "eps": eps, "activation": activation,
                      "residual": residual, "out": out})
        out.copy_(torch.zeros_like(out))

    monkeypatch.setattr(cacheflow_kernels, "skinny_gemm", fake)
    monkeypatch.setattr(linear_layers, "skinny_gemm_applies",
                        lambda x, w, silu_gated=False: x.dim() == 2 and x.shape[0] == 1)
    return calls


def test_norm_and_add_go_into_the_kernel(fake_kernel: list[dict[str, Any]]) -> None:
    """One row: forward_normed hands the RMSNorm's weight and eps to the kernel; the residual
    forms have it add in place (the returned tensor is the residual itself)."""
    col = _filled(ColumnParallelLinear(64, 96, bias=True), 1)
    row = _filled(RowParallelLinear(64, 32, bias=False), 2)
    norm = _filled(RMSNorm(64, 1e-5), 3)
    x, residual = torch.randn(1, 64), torch.randn(1, 32)
    col.forward_normed(x, norm)
    assert fake_kernel[-1]["norm_weight"] is norm.weight and fake_kernel[-1]["eps"] == 1e-5
    assert row.forward_residual(x, residual) is residual
    assert fake_kernel[-1]["residual"] is residual and fake_kernel[-1]["out"] is residual
    assert row.forward_gated_residual(torch.randn(1, 128), SiluAndMul(), residual) is residual
    assert fake_kernel[-1]["activation"] == "silu" and fake_kernel[-1]["residual"] is residual


def test_other_norms_and_layouts_stay_unfused(fake_kernel: list[dict[str, Any]]) -> None:
    """Gemma's (1 + weight) norm is not the kernel's norm, and a residual of another dtype or
    layout cannot be added in place: those calls get no norm weight and no residual."""
    col = _filled(ColumnParallelLinear(64, 96, bias=False), 1)
    row = _filled(RowParallelLinear(64, 32, bias=False), 2)
    x = torch.randn(1, 64)
    col.forward_normed(x, _filled(GemmaRMSNorm(64, 1e-6), 3))
    row.forward_residual(x, torch.randn(1, 32, dtype=torch.float64))
    row.forward_residual(x, torch.randn(32, 2)[:, :1].T)  # strided
    assert fake_kernel and all(c["norm_weight"] is None and c["residual"] is None
                               for c in fake_kernel)


def test_stream_fusion_default_and_switch(monkeypatch: pytest.MonkeyPatch,
                                          fake_kernel: list[dict[str, Any]]) -> None:
    """On by default for one-row inputs; CACHEFLOW_SKINNY_FUSE=0 turns it off."""
    w = torch.randn(96, 64)
    monkeypatch.setenv("CACHEFLOW_SKINNY_FUSE", "0")
    assert not stream_fusion_applies(torch.randn(1, 64), w)
    monkeypatch.delenv("CACHEFLOW_SKINNY_FUSE", raising=False)
    assert stream_fusion_applies(torch.randn(1, 64), w)
    assert not stream_fusion_applies(torch.randn(2, 64), w)
