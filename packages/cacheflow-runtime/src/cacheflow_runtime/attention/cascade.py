"""Cascade attention: a decode batch whose sequences all start with the same cached blocks.

With prefix caching (and after n > 1 or beam-search forks) many sequences of a decode step can
share their first KV-cache blocks: one system prompt or document, then each sequence's own
tokens. Plain decode attention reads the shared blocks once per sequence. Cascade attention
splits each sequence's context at the end of the shared blocks:

1. the prefix: every query of the batch against the shared blocks, read once (one dense
   attention with ``num_seqs * group`` query rows per KV head, non-causal: every query comes
   after the whole prefix);
2. the suffix: each sequence's own blocks, through the backend's decode attention;

and merges the two normalized outputs with their log-sum-exps (``lse``), which is exact:
``out = (o1 * e^lse1 + o2 * e^lse2) / (e^lse1 + e^lse2)``.

:func:`plan_cascade` decides per step (host data only) and :func:`cascade_decode` runs it.
Layers with a sliding window or soft-capped logits keep the plain path (see PagedAttention).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

#: Cascade runs only for decode steps of at least this many sequences ...
MIN_SEQS = 8
#: ... sharing at least this many tokens ...
MIN_PREFIX_TOKENS = 256
#: ... when the redundant prefix reads it saves, ``(num_seqs - 1) * prefix tokens``, reach this
#: many tokens: a cascade step runs eagerly (its shapes change with the prefix, so it cannot
#: replay a captured CUDA graph), which costs more than a few redundant reads at small batches.
MIN_SAVED_TOKEN_READS = 32768


@dataclass
class CascadePrefix:
    """The blocks every sequence of a decode step starts with, and what is left per sequence.

    ``num_tokens``: shared tokens (whole blocks). ``block_ids``: int64 [num_prefix_blocks], the
    shared blocks in order. ``block_tables``: int32 [num_seqs, cols], each sequence's blocks
    after the shared ones. ``context_lens``: int32 [num_seqs], each sequence's tokens after the
    prefix (at least one: its own). ``max_context_len``: their maximum (a host int).
    All tensors on the model's device.
    """

    num_tokens: int
    block_ids: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    max_context_len: int


def common_prefix_blocks(block_tables: torch.Tensor, max_blocks: int) -> int:
    """How many leading columns of ``block_tables`` (a host int tensor [num_seqs, cols]) hold
    the same block in every row, up to ``max_blocks``."""
    limit = min(max_blocks, block_tables.shape[1])
    if limit <= 0:
        return 0
    head = block_tables[:, :limit]
    same = (head == head[0]).all(dim=0)
    return limit if bool(same.all()) else int(same.to(torch.int8).argmin())


def plan_cascade(query_lens: list[int], context_lens: list[int], block_tables: torch.Tensor,
                 block_size: int, device: torch.device) -> Optional[CascadePrefix]:
    """A :class:`CascadePrefix` for a decode step (every query length 1) whose sequences share
    enough leading blocks to make cascade attention pay (see the thresholds above), else None.

    ``block_tables`` is the step's padded host table [num_seqs, cols]. Only whole blocks that
    end before every sequence's last token are shared (so every sequence keeps at least its own
    token in the suffix).
    """
    num_seqs = len(query_lens)
    if num_seqs < MIN_SEQS or any(q != 1 for q in query_lens):
        return None
    max_blocks = (min(context_lens) - 1) // block_size
    if max_blocks * block_size < MIN_PREFIX_TOKENS:
        return None
    if (num_seqs - 1) * max_blocks * block_size < MIN_SAVED_TOKEN_READS:
        return None
    shared = common_prefix_blocks(block_tables, max_blocks)
    prefix = shared * block_size
    if prefix < MIN_PREFIX_TOKENS or (num_seqs - 1) * prefix < MIN_SAVED_TOKEN_READS:
        return None
    suffix_lens = [c - prefix for c in context_lens]
    return CascadePrefix(
        num_tokens=prefix,
        block_ids=block_tables[0, :shared].to(device=device, dtype=torch.int64,
                                              non_blocking=True),
        block_tables=block_tables[:, shared:].contiguous().to(device, non_blocking=True),
        context_lens=torch.tensor(suffix_lens, dtype=torch.int32).to(device, non_blocking=True),
        max_context_len=max(suffix_lens))


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, scale: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """The tokens of ``block_ids`` as [num_tokens, num_kv_heads, head_size] in ``dtype`` (FP8
    caches dequantized with ``scale``)."""
    _, block_size, num_kv_heads, head_size = cache.shape
    if cache.dtype == torch.float8_e4m3fn:
        rows = cache.view(torch.uint8).index_select(0, block_ids).view(torch.float8_e4m3fn)
        rows = (rows.to(torch.float32) * scale).to(dtype)
    else:
        rows = cache.index_select(0, block_ids).to(dtype)
    return rows.view(-1, num_kv_heads, head_size)


def _flash_ok(query: torch.Tensor) -> bool:
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256 and query.shape[-1] % 8 == 0)


def prefix_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_ids: torch.Tensor, scale: float, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row [num_seqs, num_heads, head_size] over the tokens of
    ``block_ids`` (no mask: each query comes after all of them).

    Returns (out [num_seqs, num_heads, head_size] in the query's dtype, lse [num_seqs,
    num_heads] float32, the natural log-sum-exp of the scaled scores). The shared blocks are
    read once for the whole batch: the query heads of one KV head become the rows of one dense
    attention (FlashAttention through torch on CUDA in 16-bit, float32 matmuls otherwise).
    """
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    rows = num_seqs * group
    keys = _gather_blocks(key_cache, block_ids, k_scale, query.dtype).transpose(0, 1)
    values = _gather_blocks(value_cache, block_ids, v_scale, query.dtype).transpose(0, 1)
    # [num_seqs, kv_heads, group, d] -> [1, kv_heads, num_seqs * group, d]
    q = query.view(num_seqs, num_kv_heads, group, head_size).permute(1, 0, 2, 3)
    q = q.reshape(1, num_kv_heads, rows, head_size)
    if _flash_ok(query):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, keys.unsqueeze(0), values.unsqueeze(0), 0.0, False, False, scale=scale)[:2]
        lse = lse[..., :rows]
    else:
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(0)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.softmax(scores, dim=-1), values.float().unsqueeze(0))
    out = out.reshape(num_kv_heads, num_seqs, group, head_size).permute(1, 0, 2, 3)
    lse = lse.reshape(num_kv_heads, num_seqs, group).permute(1, 0, 2)
    return (out.reshape(num_seqs, num_heads, head_size).to(query.dtype),
            lse.reshape(num_seqs, num_heads).float())


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> torch.Tensor:
    """The attention over two disjoint key sets from each one's normalized output
    [..., head_size] and log-sum-exp [...] (float32); in ``out_a``'s dtype. A side with
    ``lse = -inf`` (no keys) contributes nothing; the other must have keys."""
    top = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - top).unsqueeze(-1)
    w_b = torch.exp(lse_b - top).unsqueeze(-1)
    merged = (out_a.float() * w_a + out_b.float() * w_b) / (w_a + w_b)
    return merged.to(out_a.dtype)


def cascade_decode(backend: ModuleType, query: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, prefix: CascadePrefix, scale: float,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """A decode step [num_seqs, num_heads, head_size] as the shared prefix once plus each
    sequence's suffix through ``backend.decode_with_lse`` (cuda or reference), merged."""
    out_p, lse_p = prefix_attention(query, key_cache, value_cache, prefix.block_ids, scale,
                                    k_scale, v_scale)
    out_s, lse_s = backend.decode_with_lse(query, key_cache, value_cache, prefix.block_tables,
                                           prefix.context_lens, prefix.max_context_len, scale,
                                           k_scale, v_scale)
    return merge_attention(out_s, lse_s, out_p, lse_p)
