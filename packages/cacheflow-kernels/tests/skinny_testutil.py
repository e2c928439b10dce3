"""Inputs and the float64 check shared by skinny_gemm's emulated and GPU tests."""

from __future__ import annotations

from typing import Any


def inputs(m: int, n: int, k: int, dtype: Any, bias: bool, seed: int,
           device: str = "cpu") -> tuple[Any, Any, Any]:
    """x [m, k], weight [n, k] (scaled so outputs are O(1)) and an optional bias [n], drawn on
    the CPU with a seeded generator and moved to ``device``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x.to(device), w.to(device), None if b is None else b.to(device)


def check(out: Any, x: Any, w: Any, b: Any) -> None:
    """``out`` equals x w^T + b within the dtype's rounding of the result (plus float32 summation
    error), and holds no NaN (every row written)."""
    import torch

    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    assert not torch.isnan(out).any()
    ulp = 2.0 ** -10 if out.dtype == torch.float16 else 2.0 ** -7
    tol = ref.abs() * ulp + 1e-4 * x.shape[1] ** 0.5
    err = (out.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max())}"
