"""PagedAttention: write this step's K/V into the paged cache, then attend over it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cacheflow_runtime.attention import reference
from cacheflow_runtime.attention.metadata import InputMetadata

BACKENDS = ("reference",)


class PagedAttention(nn.Module):
    """Multi-head attention (MHA, GQA, MQA) over a paged KV cache.

    Inputs are flattened over the batch: query [num_tokens, num_heads * head_size], key and value
    [num_tokens, num_kv_heads * head_size]. ``kv_cache`` is (key_cache, value_cache), each
    [num_blocks, block_size, num_kv_heads, head_size], or None during a profiling run (then no
    cache is written and attention runs over the new tokens only).
    """

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: Optional[int] = None, backend: str = "reference") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: Optional[tuple[torch.Tensor, torch.Tensor]],
                input_metadata: InputMetadata,
                cache_event: Optional[torch.cuda.Event] = None) -> torch.Tensor:
        """Returns the attention output [num_tokens, num_heads * head_size]."""
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_size)
        k = key.view(num_tokens, self.num_kv_heads, self.head_size)
        v = value.view(num_tokens, self.num_kv_heads, self.head_size)
        if cache_event is not None:
            # A swap into this layer's cache may still be in flight on another stream.
            cache_event.wait()
        if kv_cache is None:
            out = _attend_without_cache(q, k, v, input_metadata, self.scale)
        else:
            key_cache, value_cache = kv_cache
            reference.reshape_and_cache(k, v, key_cache, value_cache, input_metadata.slot_mapping)
            out = reference.paged_attention(q, key_cache, value_cache, input_metadata, self.scale)
        return out.view(num_tokens, self.num_heads * self.head_size)


def _attend_without_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          metadata: InputMetadata, scale: float) -> torch.Tensor:
    """Causal attention over only the new tokens of each sequence (profiling runs)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    start = 0
    for q_len in metadata.query_lens:
        qs = q[start:start + q_len].transpose(0, 1)
        ks = k[start:start + q_len].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:start + q_len].repeat_interleave(group, dim=1).transpose(0, 1)
        res = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                               scale=scale)
        out[start:start + q_len] = res.transpose(0, 1)
        start += q_len
    return out
