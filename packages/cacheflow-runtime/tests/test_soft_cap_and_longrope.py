"""Attention logit soft-capping (reference backend, the profiling path, the cuda backend's
routing) and longrope rotary scaling (short / long tables per sequence, the attention factor)."""

from __future__ import annotations

import math

import pytest
import torch
from test_reference_attention import _metadata as reference_metadata

from cacheflow_runtime.attention import InputMetadata, PagedAttention, reference
from cacheflow_runtime.layers.rotary_embedding import RotaryEmbedding, longrope_settings


def _metadata(query_lens: list[int], context_lens: list[int], block_size: int
              ) -> tuple[InputMetadata, list[list[int]]]:
    """One block table per sequence (consecutive blocks) and slots for the new tokens."""
    tables, slots, next_block = [], [], 0
    for q, c in zip(query_lens, context_lens):
        n = -(-c // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
        slots += [tables[-1][p // block_size] * block_size + p % block_size
                  for p in range(c - q, c)]
    return reference_metadata(query_lens, context_lens, tables, slots), tables


def _capped_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cap: float,
                  window: int | None = None) -> torch.Tensor:
    """Prompt attention [L, H, D] with scores cap * tanh(s / cap), in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    scores = cap * torch.tanh(scores / cap)
    diff = torch.arange(q.shape[0])[:, None] - torch.arange(k.shape[0])[None, :]
    hidden = (diff < 0) | ((diff >= window) if window is not None else False)
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 5])
def test_reference_soft_cap_matches_dense(window: int | None) -> None:
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, d, block = 4, 2, 16, 8
    lens = [13, 6]
    meta, _ = _metadata(lens, lens, block)
    q = torch.randn(sum(lens), heads, d, generator=gen) * 3  # scores well past the cap
    k = torch.randn(sum(lens), kv_heads, d, generator=gen) * 3
    v = torch.randn(sum(lens), kv_heads, d, generator=gen)
    key_cache = torch.full((4, block, kv_heads, d), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    reference.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
    scale, cap = d ** -0.5, 2.0
    out = reference.paged_attention(q, key_cache, value_cache, meta, scale,
                                    sliding_window=window, logits_soft_cap=cap)
    uncapped = reference.paged_attention(q, key_cache, value_cache, meta, scale,
                                         sliding_window=window)
    start = 0
    for n in lens:
        part = slice(start, start + n)
        expected = _capped_dense(q[part], k[part], v[part], scale, cap, window)
        torch.testing.assert_close(out[part].double(), expected, atol=1e-5, rtol=1e-5)
        start += n
    assert (out - uncapped).abs().max() > 0.1  # the cap changes the result


def test_profiling_path_soft_caps_like_the_cache() -> None:
    gen = torch.Generator().manual_seed(3)
    layer = PagedAttention(4, 16, 0.25, num_kv_heads=1, sliding_window=6, logits_soft_cap=1.5)
    lens = [9, 4]
    meta, _ = _metadata(lens, lens, 8)
    q = torch.randn(13, 64, generator=gen) * 3
    k = torch.randn(13, 16, generator=gen) * 3
    v = torch.randn(13, 16, generator=gen)
    cache = (torch.zeros(4, 8, 1, 16), torch.zeros(4, 8, 1, 16))
    torch.testing.assert_close(layer(q, k, v, None, meta), layer(q, k, v, cache, meta),
                               atol=1e-5, rtol=1e-5)


def test_soft_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="logits_soft_cap must be a positive number"):
        PagedAttention(4, 16, 0.25, logits_soft_cap=0.0)



# longrope: head 16, rotary on the first 8 features, trained on 16 positions, stretched to 64.
SHORT = [1.0, 1.1, 1.3, 1.7]
LONG = [1.0, 2.0, 4.0, 8.0]
LONGROPE = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
            "original_max_position_embeddings": 16}


def _expected_rotation(x: torch.Tensor, position: int, factors: list[float],
                       attention: float) -> torch.Tensor:
    """HF's neox rotation of the first 8 features of each head of x [heads * 16]."""
    inv_freq = 1.0 / (torch.tensor(factors) * 10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    freqs = position * inv_freq
    cos, sin = freqs.cos() * attention, freqs.sin() * attention
    heads = x.view(-1, 16)
    rot, rest = heads[:, :8], heads[:, 8:]
    x1, x2 = rot[:, :4], rot[:, 4:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1).reshape(-1)


def test_longrope_settings_follow_hf() -> None:
    original, short, long, attention = longrope_settings(8, 64, LONGROPE)
    assert original == 16
    assert attention == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))
    assert torch.allclose(short * torch.tensor(SHORT), long * torch.tensor(LONG))
    _, _, _, explicit = longrope_settings(8, 64, {**LONGROPE, "attention_factor": 1.25})
    assert explicit == 1.25
    _, _, _, unscaled = longrope_settings(8, 16, LONGROPE)
    assert unscaled == 1.0


@pytest.mark.parametrize("bad, message", [
    ({"short_factor": [1.0, 1.0]}, "short_factor must be a list of 4"),
    ({"long_factor": None}, "long_factor must be a list of 4"),
    ({"original_max_position_embeddings": None}, "needs original_max_position_embeddings"),
])
def test_longrope_settings_errors(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RotaryEmbedding(16, 8, 64, 10000.0, True, {**LONGROPE, **bad})


def test_su_is_longrope() -> None:
    su = RotaryEmbedding(16, 8, 64, 10000.0, True, {**LONGROPE, "rope_type": "su"})
    longrope = RotaryEmbedding(16, 8, 64, 10000.0, True, LONGROPE)
    assert torch.equal(su.cos_sin_cache, longrope.cos_sin_cache)


def test_longrope_switches_per_sequence_at_the_original_length() -> None:
    rope = RotaryEmbedding(16, 8, 64, 10000.0, True, LONGROPE)
    attention = math.sqrt(1 + math.log(4) / math.log(16))
    gen = torch.Generator().manual_seed(11)
    # A 3-token prompt (short), a decode at position 20 (sequence of 21: long), a 2-token
    # chunk ending at position 16 (sequence of 17: long, its position 15 too), a decode at
    # position 15 (sequence of 16: short).
    positions = torch.tensor([0, 1, 2, 20, 15, 16, 15])
    query_lens, context_lens = [3, 1, 2, 1], [3, 21, 17, 16]
    long_rows = [False, False, False, True, True, True, False]
    q = torch.randn(7, 32, generator=gen)
    k = torch.randn(7, 16, generator=gen)
    q_out, k_out = rope(positions, q.clone(), k.clone(), query_lens, context_lens)
    for t, (pos, is_long) in enumerate(zip(positions.tolist(), long_rows)):
        factors = LONG if is_long else SHORT
        torch.testing.assert_close(q_out[t], _expected_rotation(q[t], pos, factors, attention))
        torch.testing.assert_close(k_out[t], _expected_rotation(k[t], pos, factors, attention))
    # Decode steps alone decide from positions (no host lists needed, as in CUDA graphs).
    decode_q, _ = rope(torch.tensor([15, 16]), q[:2].clone(), k[:2].clone(), [1, 1], [16, 17])
    torch.testing.assert_close(decode_q[0], _expected_rotation(q[0], 15, SHORT, attention))
    torch.testing.assert_close(decode_q[1], _expected_rotation(q[1], 16, LONG, attention))
    # Without sequence lengths the batch is one sequence (HF's rule).
    batch_q, _ = rope(torch.tensor([3, 16]), q[:2].clone(), k[:2].clone())
    torch.testing.assert_close(batch_q[0], _expected_rotation(q[0], 3, LONG, attention))


def test_longrope_rejects_positions_past_the_stretched_length() -> None:
    rope = RotaryEmbedding(16, 8, 64, 10000.0, True, LONGROPE)
    with pytest.raises(ValueError, match="position 64 is past the rotary table"):
        rope(torch.tensor([64]), torch.zeros(1, 16), torch.zeros(1, 16))
