"""Exp(1) noise for seeded sampling, from a counter-based hash computed where the logits are.

The noise of vocabulary entry ``v`` for a draw with key ``k`` (a request's seed, per sample)
at sequence position ``p`` is a pure function of ``(k, p, v)``: no generator state, so a seeded
request draws the same tokens whatever else is in the batch, in whatever order its steps come,
and the host does nothing per row. The hash is MurmurHash3's 32-bit finalizer applied in
rounds over the key's halves, the position and the index, on int64 tensors that hold 32-bit
values (every product is split so that nothing overflows).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``(h * c) mod 2**32`` for ``h`` holding 32-bit values, without int64 overflow."""
    low = (h & 0xFFFF) * c
    high = ((h >> 16) * c) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's fmix32 over 32-bit values held in an int64 tensor."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def seed_key(seed: int, index: int) -> int:
    """The key of the ``index``-th sample of a request seeded with ``seed`` (a 63-bit int)."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (1 << 63)


def hashed_exponential(keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[len(keys), vocab]`` float32 Exp(1) noise: row i is a function of ``keys[i]`` (int64,
    non-negative) and ``positions[i]`` alone, on their device.

    Raises:
        ValueError: ``keys`` and ``positions`` differ in length.
    """
    if keys.shape != positions.shape:
        raise ValueError(f"{keys.shape[0]} keys but {positions.shape[0]} positions")
    keys = keys.to(torch.int64)
    row = _mix32(keys & _MASK32)
    row = _mix32(row ^ ((keys >> 32) & _MASK32))
    row = _mix32(row ^ (positions.to(torch.int64) & _MASK32))
    columns = _mix32(_mul32(torch.arange(vocab, dtype=torch.int64, device=keys.device),
                            _GOLDEN32))
    h = _mix32(row.unsqueeze(1) ^ columns.unsqueeze(0))
    h = _mix32(h ^ row.unsqueeze(1))
    # 24 bits: exact in float32; u in (0, 1), so the noise is finite and positive.
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)
