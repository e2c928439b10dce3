"""The reference attention backend: plain torch, any device, exact in float32.

It is the oracle that the CUDA kernels are tested against, so it favours clarity over speed.
Cache layout (shared with cacheflow_kernels): key_cache and value_cache are
[num_blocks, block_size, num_kv_heads, head_size].
"""

from __future__ import annotations

import torch

from cacheflow_runtime.attention.metadata import InputMetadata


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Writes key/value [num_tokens, num_kv_heads, head_size] into their cache slots.

    Tokens whose slot is negative are skipped.
    """
    num_blocks, block_size, num_kv_heads, head_size = key_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat_k = key_cache.view(num_blocks * block_size, num_kv_heads, head_size)
    flat_v = value_cache.view(num_blocks * block_size, num_kv_heads, head_size)
    flat_k.index_copy_(0, slots, key[keep].to(key_cache.dtype))
    flat_v.index_copy_(0, slots, value[keep].to(value_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor,
                   context_len: int) -> torch.Tensor:
    """Reads the first ``context_len`` tokens of one sequence out of the paged cache.

    Returns [context_len, num_kv_heads, head_size].
    """
    block_size = cache.shape[1]
    positions = torch.arange(context_len, device=cache.device)
    blocks = block_table.long()[positions // block_size]
    return cache[blocks, positions % block_size]


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    metadata: InputMetadata, scale: float,
                    alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    query: [num_tokens, num_heads, head_size] (flattened over sequences as in ``metadata``);
    returns the same shape. Query j of sequence i (j < query_lens[i]) sits at position
    context_lens[i] - query_lens[i] + j and sees every position up to and including its own.
    Computed in float32 whatever the input dtype.
    """
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(metadata.query_lens, metadata.context_lens_host)):
        q = query[start:start + q_len].float()
        k = gather_context(key_cache, metadata.block_tables[i], ctx_len).float()
        v = gather_context(value_cache, metadata.block_tables[i], ctx_len).float()
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
        k_pos = torch.arange(ctx_len, device=query.device)
        if alibi_slopes is not None:
            distance = k_pos[None, :] - q_pos[:, None]
            scores = scores + alibi_slopes.float()[:, None, None] * distance
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        start += q_len
    return out
