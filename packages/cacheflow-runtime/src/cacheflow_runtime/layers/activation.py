"""Activation functions, including the gated ones of fused MLP projections (on CUDA by the
kernels of cacheflow-kernels, which compute in float32 and round once like these torch ops)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cacheflow_runtime.kernels import kernels_for


def _kernels(x: torch.Tensor) -> Any:
    """cacheflow_kernels for a non-empty contiguous CUDA ``x``, else None (the torch code)."""
    return kernels_for(x) if x.numel() and x.is_contiguous() else None


def _gated_out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)


class SiluAndMul(nn.Module):
    """x = [gate; up] on the last dim -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halves the last dimension."""
        ck = _kernels(x)
        if ck is not None:
            out = _gated_out(x)
            ck.silu_and_mul(out, x)
            return out
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """x = [gate; up] on the last dim -> gelu(gate) * up (exact or tanh approximation)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halves the last dimension."""
        ck = _kernels(x)
        if ck is not None:
            out = _gated_out(x)
            ck.gelu_and_mul(out, x, self.approximate)
            return out
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU used by GPT-2 ("gelu_new")."""
    ck = _kernels(x)
    if ck is not None:
        out = torch.empty_like(x)
        ck.gelu_new(out, x)
        return out
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """The "gelu_fast" approximation of HF transformers."""
    ck = _kernels(x)
    if ck is not None:
        out = torch.empty_like(x)
        ck.gelu_fast(out, x)
        return out
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_fast,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def get_act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation named ``name`` in an HF config (ValueError listing the known ones)."""
    key = name.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[key]
