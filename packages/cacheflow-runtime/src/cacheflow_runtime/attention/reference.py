"""The reference attention backend: plain torch, any device, exact in float32.

It is the oracle that the CUDA kernels are tested against, so it favours clarity over speed.
Cache layout (shared with cacheflow_kernels): key_cache and value_cache are
[num_blocks, block_size, num_kv_heads, head_size], in the model's dtype or FP8 E4M3
(``torch.float8_e4m3fn``): then it does what the kernels do, quantizing ``x / scale`` on write
(round to nearest, saturating at +-448) and multiplying by the scale on read, so CPU runs test
the FP8 path end to end.
"""

from __future__ import annotations

import torch

from cacheflow_runtime.attention.metadata import InputMetadata

#: The FP8 KV-cache dtype and the largest magnitude it holds.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` as FP8 E4M3, rounded to nearest and saturated at +-448 (as the kernel).

    The division is float32 IEEE division by a tensor: torch divides a CUDA tensor by a Python
    number as a multiplication by its reciprocal, which rounds differently now and then.
    """
    divisor = torch.tensor(scale, dtype=torch.float32, device=x.device)
    return (x.float() / divisor).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _store(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, scale: float) -> None:
    num_blocks, block_size, num_kv_heads, head_size = cache.shape
    flat = cache.view(num_blocks * block_size, num_kv_heads, head_size)
    if cache.dtype == FP8_DTYPE:
        # index_copy_ has no float8 kernel: copy the bytes.
        flat.view(torch.uint8).index_copy_(0, slots, quantize_fp8(rows, scale).view(torch.uint8))
    else:
        flat.index_copy_(0, slots, rows.to(cache.dtype))


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Writes key/value [num_tokens, num_kv_heads, head_size] into their cache slots.

    Tokens whose slot is negative are skipped. FP8 caches store ``key / k_scale`` and
    ``value / v_scale``.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    _store(key_cache, slots, key[keep], k_scale)
    _store(value_cache, slots, value[keep], v_scale)


def _read(cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
          scale: float) -> torch.Tensor:
    """Cache rows at (blocks, offsets) in float32, dequantized for an FP8 cache."""
    if cache.dtype == FP8_DTYPE:
        return cache.view(torch.uint8)[blocks, offsets].view(FP8_DTYPE).float() * scale
    return cache[blocks, offsets].float()


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
    if cache.dtype == FP8_DTYPE:
        return cache.view(torch.uint8)[blocks, positions % block_size].view(FP8_DTYPE)
    return cache[blocks, positions % block_size]


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    metadata: InputMetadata, scale: float,
                    alibi_slopes: torch.Tensor | None = None,
                    sliding_window: int | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    query: [num_tokens, num_heads, head_size] (flattened over sequences as in ``metadata``);
    returns the same shape. Query j of sequence i (j < query_lens[i]) sits at position
    context_lens[i] - query_lens[i] + j and sees every position up to and including its own
    (with ``sliding_window`` W, only the last W of them: key position > query position - W).
    ``logits_soft_cap`` c (Gemma 2) squashes the scaled scores to ``c * tanh(scores / c)`` before
    masking and softmax.
    Computed in float32 whatever the input dtype; sequences are padded to the longest query and
    context of the batch and masked. FP8 caches are read as ``cache * k_scale`` (keys) and
    ``cache * v_scale`` (values). ``logits_soft_cap`` (Gemma 2): the scaled scores become
    ``cap * tanh(score / cap)`` before ALiBi and the mask.
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
    keys = _read(key_cache, blocks, k_pos % block_size, k_scale)
    values = _read(value_cache, blocks, k_pos % block_size, v_scale)
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


def decode_with_lse(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    max_context_len: int, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention (query [num_seqs, num_heads, head_size], one token per sequence, after
    its whole context) that also returns each row's log-sum-exp.

    Sequence s attends to its first ``context_lens[s]`` cached tokens through
    ``block_tables[s]``. Returns (out in the query's dtype, lse [num_seqs, num_heads] float32,
    ``-inf`` for an empty context, whose output is zeros).
    """
    num_seqs, num_heads, _ = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    device = query.device
    k_pos = torch.arange(max_context_len, device=device)
    blocks = block_tables.long().gather(
        1, (k_pos // block_size).clamp(max=max(block_tables.shape[1] - 1, 0))
        .expand(num_seqs, -1))
    keys = _read(key_cache, blocks, k_pos % block_size, k_scale)
    values = _read(value_cache, blocks, k_pos % block_size, v_scale)
    in_context = k_pos[None, :] < context_lens.to(device)[:, None]  # [num_seqs, max_ctx]
    group = num_heads // num_kv_heads
    keys = torch.where(in_context[:, :, None, None], keys, 0.0).repeat_interleave(group, dim=2)
    values = torch.where(in_context[:, :, None, None], values, 0.0)
    values = values.repeat_interleave(group, dim=2)
    scores = torch.einsum("shd,skhd->shk", query.float(), keys) * scale
    scores = scores.masked_fill(~in_context[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)
    out = torch.einsum("shk,skhd->shd", probs, values)
    return out.to(query.dtype), lse
