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
from cacheflow_runtime.layers.linear import ReplicatedLinear, linear


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

    def counted(out: Any, x: Any, weight: Any, bias: Any = None,
                activation: Any = None) -> None:
        seen.append(x.shape[0])
        original(out, x, weight, bias, activation)

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
