"""skinny_gemm's Python argument checks on CPU tensors: every bad argument is named in a
ValueError before the kernel library is touched (``get_function`` is a tripwire here)."""

from __future__ import annotations

from typing import Any

import pytest
from elementwise_testutil import FakeCuda

import cacheflow_kernels as ck
from cacheflow_kernels import _gemm_ops

torch = pytest.importorskip("torch")


@pytest.fixture
def called(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The library calls that got through the checks (the tripwire records instead of running)."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(_gemm_ops, "get_function",
                        lambda name: lambda *args: calls.append((name, *args)))
    return calls


def args(m: int = 1, n: int = 48, k: int = 256, dtype: Any = torch.float16,
         bias: bool = True) -> dict[str, Any]:
    return {
        "out": FakeCuda(torch.empty(m, n, dtype=dtype)),
        "x": FakeCuda(torch.empty(m, k, dtype=dtype)),
        "weight": FakeCuda(torch.empty(n, k, dtype=dtype)),
        "bias": FakeCuda(torch.empty(n, dtype=dtype)) if bias else None,
    }


def test_valid_arguments_reach_the_library(called: list[tuple[Any, ...]]) -> None:
    a = args(m=2, bias=False)
    ck.skinny_gemm(**a)
    gated = {**a, "x": FakeCuda(torch.empty(2, 512, dtype=torch.float16))}
    ck.skinny_gemm(**gated, activation="silu")
    norm = FakeCuda(torch.empty(256, dtype=torch.float16))
    ck.skinny_gemm(**a, norm_weight=norm, eps=1e-5, residual=a["out"])
    assert called == [
        ("skinny_gemm", a["out"], a["x"], a["weight"], None, "", None, 1e-6, None),
        ("skinny_gemm", a["out"], gated["x"], a["weight"], None, "silu", None, 1e-6, None),
        ("skinny_gemm", a["out"], a["x"], a["weight"], None, "", norm, 1e-5, a["out"])]


@pytest.mark.parametrize(("change", "name", "says"), [
    ({"x": FakeCuda(torch.empty(3, 256, dtype=torch.float16)),
      "out": FakeCuda(torch.empty(3, 48, dtype=torch.float16))}, "x", "1 to 2 rows"),
    ({"x": FakeCuda(torch.empty(1, 200, dtype=torch.float16))}, "x", "multiple of 64"),
    ({"x": FakeCuda(torch.empty(1, 32768, dtype=torch.float16))}, "x", "at most 16384"),
    ({"x": FakeCuda(torch.empty(1, 256, dtype=torch.float32))}, "x", "float16 or bfloat16"),
    ({"weight": FakeCuda(torch.empty(48, 128, dtype=torch.float16))}, "weight", "k=256"),
    ({"weight": FakeCuda(torch.empty(48, 256, dtype=torch.bfloat16))}, "weight", "float16"),
    ({"weight": FakeCuda(torch.empty(256, 48, dtype=torch.float16).T)}, "weight",
     "contiguous"),
    ({"out": FakeCuda(torch.empty(1, 47, dtype=torch.float16))}, "out", "n=48"),
    ({"bias": FakeCuda(torch.empty(47, dtype=torch.float16))}, "bias", "n=48"),
    ({"x": torch.empty(1, 256, dtype=torch.float16)}, "x", "a CUDA tensor"),
    # one row whose elements are 2 apart: not "rows contiguous", even with a single row
    ({"x": FakeCuda(torch.empty(256, 2, dtype=torch.float16).T[:1])}, "x", "rows contiguous"),
    ({"out": FakeCuda(torch.empty(48, 2, dtype=torch.float16).T[:1])}, "out", "rows contiguous"),
    ({"weight": FakeCuda(torch.empty(48, 256, dtype=torch.float16), index=1)}, "weight",
     "same device"),
])
def test_bad_argument_is_named(called: list[tuple[Any, ...]], change: dict[str, Any],
                               name: str, says: str) -> None:
    a = {**args(), **change}
    with pytest.raises(ValueError, match=f"'{name}'.*{says}"):
        ck.skinny_gemm(**a)
    assert called == []


def test_strided_x_rows_must_stay_16_byte_aligned(called: list[tuple[Any, ...]]) -> None:
    buf = torch.empty(2, 256 + 4, dtype=torch.float16)  # a row stride of 260 elements
    a = {**args(m=2), "x": FakeCuda(buf[:, :256]), "out": FakeCuda(torch.empty(2, 48,
                                                                             dtype=torch.float16))}
    with pytest.raises(ValueError, match="'x'.*16-byte aligned"):
        ck.skinny_gemm(**a)
    wide = torch.empty(2, 256 + 64, dtype=torch.float16)  # 320: a multiple of 8
    ck.skinny_gemm(**{**a, "x": FakeCuda(wide[:, :256])})
    assert len(called) == 1


def test_gated_x_is_twice_as_wide(called: list[tuple[Any, ...]]) -> None:
    with pytest.raises(ValueError, match="'weight'.*k=128"):
        ck.skinny_gemm(**args(k=256), activation="silu")  # x [1, 256] = [gate | up] of k = 128
    with pytest.raises(ValueError, match="'activation'.*'silu'"):
        ck.skinny_gemm(**args(), activation="gelu")
    assert called == []


@pytest.mark.parametrize(("change", "name", "says"), [
    ({"norm_weight": FakeCuda(torch.empty(255, dtype=torch.float16))}, "norm_weight", "k=256"),
    ({"norm_weight": FakeCuda(torch.empty(256, dtype=torch.bfloat16))}, "norm_weight",
     "float16"),
    ({"norm_weight": FakeCuda(torch.empty(512, dtype=torch.float16)[::2])}, "norm_weight",
     "contiguous"),
    ({"norm_weight": FakeCuda(torch.empty(256, dtype=torch.float16)), "eps": 0.0}, "eps",
     "above 0"),
    ({"norm_weight": FakeCuda(torch.empty(256, dtype=torch.float16)), "eps": float("nan")},
     "eps", "above 0"),
    ({"residual": FakeCuda(torch.empty(1, 47, dtype=torch.float16))}, "residual", "n=48"),
    ({"residual": FakeCuda(torch.empty(1, 48, dtype=torch.bfloat16))}, "residual", "float16"),
    ({"residual": FakeCuda(torch.empty(48, 2, dtype=torch.float16).T[:1])}, "residual",
     "rows contiguous"),
    ({"residual": FakeCuda(torch.empty(1, 48, dtype=torch.float16), index=1)}, "residual",
     "same device"),
])
def test_bad_norm_or_residual_is_named(called: list[tuple[Any, ...]], change: dict[str, Any],
                                       name: str, says: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}'.*{says}"):
        ck.skinny_gemm(**{**args(), **change})
    assert called == []


def test_norm_is_not_for_the_gated_x(called: list[tuple[Any, ...]]) -> None:
    """The gated x is the MLP's intermediate: no norm comes before the down projection."""
    a = {**args(k=128), "x": FakeCuda(torch.empty(1, 256, dtype=torch.float16))}
    with pytest.raises(ValueError, match="'norm_weight'.*None with activation 'silu'"):
        ck.skinny_gemm(**a, activation="silu",
                       norm_weight=FakeCuda(torch.empty(128, dtype=torch.float16)))
    assert called == []
