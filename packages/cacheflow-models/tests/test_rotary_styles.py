"""The runtime's rotary embedding in both styles against HF transformers' own functions."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama

from cacheflow_runtime.layers.rotary_embedding import RotaryEmbedding


@pytest.mark.parametrize("rotary_dim", [64, 32, 16])
def test_gptj_style_matches_hf_gptj(rotary_dim: int) -> None:
    gen = torch.Generator().manual_seed(rotary_dim)
    heads, head_size, tokens = 3, 64, 11
    positions = torch.randint(0, 200, (tokens,), generator=gen)
    query = torch.randn(tokens, heads * head_size, generator=gen)
    key = torch.randn(tokens, heads * head_size, generator=gen)
    rope = RotaryEmbedding(head_size, rotary_dim, 256, 10000.0, is_neox_style=False)
    q_out, k_out = rope(positions, query.clone(), key.clone())

    table = modeling_gptj.create_sinusoidal_positions(256, rotary_dim)
    sin, cos = table[positions][None].split(rotary_dim // 2, dim=-1)

    def hf(x: torch.Tensor) -> torch.Tensor:
        x = x.view(1, tokens, heads, head_size)
        rot = modeling_gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
        return torch.cat((rot, x[..., rotary_dim:]), dim=-1).view(tokens, -1)

    torch.testing.assert_close(q_out, hf(query), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_out, hf(key), atol=1e-6, rtol=1e-6)
    if rotary_dim < head_size:  # the features past rotary_dim pass through untouched
        tail = q_out.view(tokens, heads, head_size)[..., rotary_dim:]
        assert torch.equal(tail, query.view(tokens, heads, head_size)[..., rotary_dim:])


def test_neox_style_matches_hf_llama() -> None:
    gen = torch.Generator().manual_seed(7)
    heads, head_size, tokens = 4, 32, 9
    positions = torch.randint(0, 100, (tokens,), generator=gen)
    query = torch.randn(tokens, heads * head_size, generator=gen)
    key = torch.randn(tokens, heads * head_size, generator=gen)
    rope = RotaryEmbedding(head_size, head_size, 128, 500000.0, is_neox_style=True)
    q_out, k_out = rope(positions, query, key)

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_size, 2).float() / head_size))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None], emb.sin()[None]
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(
        query.view(1, tokens, heads, head_size).transpose(1, 2),
        key.view(1, tokens, heads, head_size).transpose(1, 2), cos, sin)
    torch.testing.assert_close(q_out, q_ref.transpose(1, 2).reshape(tokens, -1),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_out, k_ref.transpose(1, 2).reshape(tokens, -1),
                               atol=1e-6, rtol=1e-6)
