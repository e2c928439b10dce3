"""The reference paged attention against dense causal attention computed directly."""

from __future__ import annotations

import pytest
import torch

from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.attention.reference import paged_attention, reshape_and_cache


def _metadata(query_lens: list[int], context_lens: list[int], tables: list[list[int]],
              slots: list[int]) -> InputMetadata:
    width = max(len(t) for t in tables)
    cu = [0]
    for q in query_lens:
        cu.append(cu[-1] + q)
    return InputMetadata(
        query_lens=query_lens, context_lens_host=context_lens,
        query_start_loc=torch.tensor(cu, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        logit_indices=torch.tensor([c - 1 for c in cu[1:]]), is_prompt=True)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           offset: int) -> torch.Tensor:
    """Causal attention of q [Lq, H, D] over k, v [Lk, Hkv, D], query i at position offset+i."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(q.shape[0])[:, None] + offset
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_matches_dense_with_poisoned_cache(dtype: torch.dtype, num_heads: int,
                                           num_kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    block_size, head_size, num_blocks = 8, 16, 40
    # (tokens already cached, new tokens): prefill, decode, and a prefix-cached chunk.
    shapes = [(0, 13), (20, 1), (9, 5), (0, 1), (31, 1)]
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_size), float("nan"),
                           dtype=dtype)
    value_cache = torch.full_like(key_cache, float("nan"))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, q_parts, full_k, full_v = [], [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        k = torch.randn(total, num_kv_heads, head_size, generator=gen).to(dtype)
        v = torch.randn(total, num_kv_heads, head_size, generator=gen).to(dtype)
        old = [table[p // block_size] * block_size + p % block_size for p in range(cached)]
        reshape_and_cache(k[:cached], v[:cached], key_cache, value_cache,
                          torch.tensor(old, dtype=torch.int64))
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(cached, total)]
        q_parts.append(torch.randn(new, num_heads, head_size, generator=gen).to(dtype))
        full_k.append(k)
        full_v.append(v)
    meta = _metadata([n for _, n in shapes], [c + n for c, n in shapes], tables, slots)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes)])
    reshape_and_cache(new_k, new_v, key_cache, value_cache, meta.slot_mapping)
    scale = head_size ** -0.5
    out = paged_attention(torch.cat(q_parts), key_cache, value_cache, meta, scale)
    assert torch.isfinite(out).all()
    start = 0
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for (cached, new), q, k, v in zip(shapes, q_parts, full_k, full_v):
        ref = _dense(q, k, v, scale, cached)
        torch.testing.assert_close(out[start:start + new].double(), ref, atol=tol, rtol=tol)
        start += new


def test_negative_slots_are_not_written() -> None:
    cache = torch.zeros(2, 8, 1, 4)
    values = torch.ones(3, 1, 4)
    reshape_and_cache(values, values, cache, cache.clone(), torch.tensor([3, -1, 9]))
    written = (cache.abs().sum(dim=(2, 3)) > 0).nonzero().tolist()
    assert written == [[0, 3], [1, 1]]
