"""Rotary position embeddings (neox and gpt-j styles, partial rotary, rope_scaling)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

ROPE_SCALING_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(rotary_dim: int, base: float,
                  rope_scaling: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """The inverse frequencies [rotary_dim / 2] in float32, as HF transformers computes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float()
                               / rotary_dim))
    kind = _scaling_type(rope_scaling)
    if kind == "linear":
        inv_freq = inv_freq / float(rope_scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


def _scaling_type(rope_scaling: Optional[dict[str, Any]]) -> str:
    if not rope_scaling:
        return "default"
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: "
                         f"{ROPE_SCALING_TYPES}")
    return kind


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    factor = float(cfg["factor"])
    low_freq_factor = float(cfg["low_freq_factor"])
    high_freq_factor = float(cfg["high_freq_factor"])
    old_len = float(cfg["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to the first ``rotary_dim`` features of each head.

    neox style rotates the two halves of those features against each other (LLaMA, GPT-NeoX);
    gpt-j style rotates interleaved pairs (GPT-J).
    """

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool = True,
                 rope_scaling: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        if rotary_dim > head_size or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and <= head_size ({head_size}), "
                             f"got {rotary_dim}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        self.max_position = max_position
        inv_freq = rope_inv_freq(rotary_dim, base, rope_scaling)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, H*D] and key [T, Hkv*D] with rotary applied at ``positions`` [T]."""
        if positions.numel() and int(positions.max()) >= self.max_position:
            raise ValueError(f"position {int(positions.max())} is past the rotary table "
                             f"({self.max_position} positions)")
        cos = self.cos_cache[positions]
        sin = self.sin_cache[positions]
        return self._apply(query, cos, sin), self._apply(key, cos, sin)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_size)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        cos = cos.to(x.dtype)[:, None, :]
        sin = sin.to(x.dtype)[:, None, :]
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((rotated, rest), dim=-1).view(num_tokens, -1)
