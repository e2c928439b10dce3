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


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(scores / cap)`` (attention logit soft-capping); ``scores`` when cap is None."""
    if cap is None:
        return scores
    return torch.tanh(scores / cap) * cap


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
                    alibi_slopes: torch.Tensor | None = None,
                    sliding_window: int | None = None,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    query: [num_tokens, num_heads, head_size] (flattened over sequences as in ``metadata``);
    returns the same shape. Query j of sequence i (j < query_lens[i]) sits at position
    context_lens[i] - query_lens[i] + j and sees every position up to and including its own
    (with ``sliding_window`` W, only the last W of them: key position > query position - W).
    ``logits_soft_cap`` c (Gemma 2) squashes the scaled scores to ``c * tanh(scores / c)`` before
    masking and softmax.
    Computed in float32 whatever the input dtype; sequences are padded to the longest query and
    context of the batch and masked.
    """
    num_seqs = metadata.num_seqs
    if num_seqs == 0:
        return torch.empty_like(query)
    device = query.device
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    block_size = key_cache.shape[1]
    max_q, max_ctx = metadata.max_query_len, metadata.max_context_len
    q_lens = torch.tensor(metadata.query_lens, device=device)
    ctx_lens = torch.tensor(metadata.context_lens_host, device=device)

    # Gather every sequence's context out of the paged cache: [num_seqs, max_ctx, kv_heads, d].
    k_pos = torch.arange(max_ctx, device=device)
    blocks = metadata.block_tables.long().gather(
        1, (k_pos // block_size).clamp(max=metadata.block_tables.shape[1] - 1)
        .expand(num_seqs, -1))
    keys = key_cache[blocks, k_pos % block_size].float()
    values = value_cache[blocks, k_pos % block_size].float()
    # Slots past a sequence's context hold whatever the cache had (NaN is possible): a zero
    # attention weight times NaN is still NaN, so clear them.
    in_context = (k_pos[None, :] < ctx_lens[:, None])[:, :, None, None]
    keys = torch.where(in_context, keys, 0.0)
    values = torch.where(in_context, values, 0.0)
    group = num_heads // num_kv_heads
    if group > 1:
        keys = keys.repeat_interleave(group, dim=2)
        values = values.repeat_interleave(group, dim=2)

    # Scatter the flat queries into [num_seqs, max_q, heads, d].
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
    starts = torch.cumsum(q_lens, 0) - q_lens
    slot_in_seq = torch.arange(query.shape[0], device=device) - starts[seq_of_token]
    padded_q = query.new_zeros((num_seqs, max_q, num_heads, head_size), dtype=torch.float32)
    padded_q[seq_of_token, slot_in_seq] = query.float()

    scores = soft_cap(torch.einsum("sqhd,skhd->shqk", padded_q, keys) * scale, logits_soft_cap)
    q_pos = (ctx_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
    if alibi_slopes is not None:
        distance = (k_pos[None, None, :] - q_pos[:, :, None]).float()
        scores = scores + alibi_slopes.float()[None, :, None, None] * distance[:, None]
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & \
        (k_pos[None, None, :] < ctx_lens[:, None, None])
    if sliding_window is not None:
        visible = visible & (k_pos[None, None, :] > q_pos[:, :, None] - sliding_window)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("shqk,skhd->sqhd", probs, values)
    return out[seq_of_token, slot_in_seq].to(query.dtype)
