"""Normalization layers computed the way HF transformers computes them (on CUDA by the fused
kernels of cacheflow-kernels, which follow the same math)."""

from __future__ import annotations

import torch
from torch import nn

from cacheflow_runtime.kernels import kernels_for


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (LLaMA), reduced in float32 and scaled in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype),
                                   requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalizes ``x`` [..., hidden]; with ``residual``, first adds it and returns
        (normed, new residual).

        With ``residual`` the inputs are consumed: on CUDA the fused kernel writes the normed
        values into ``x`` and the sum into ``residual`` and returns them.
        """
        ck = kernels_for(x, self.weight) if x.is_contiguous() else None
        if ck is not None and x.numel():
            rows = x.view(-1, x.shape[-1])
            if residual is None:
                out = torch.empty_like(rows)
                ck.rms_norm(out, rows, self.weight, self.eps)
                return out.view(x.shape)
            if kernels_for(residual, x) is not None and residual.is_contiguous():
                ck.fused_add_rms_norm(rows, residual.view(rows.shape), self.weight, self.eps)
                return x, residual
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)``, all in float32, rounded to the input dtype
    once at the end (the checkpoint stores ``weight`` around 0, not around 1)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype),
                                   requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalizes ``x`` [..., hidden] over its last dimension."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)
