"""PagedAttention: write this step's K/V into the paged cache, then attend over it."""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import nn

from cacheflow_runtime.attention import cuda, reference
from cacheflow_runtime.attention.metadata import InputMetadata

#: "auto": the cuda backend for CUDA tensors when cacheflow_kernels has CUDA (and the head size
#: is one its kernels support), else the reference backend; "reference": plain torch, any
#: device; "cuda": cacheflow_kernels (decode and prefill kernels).
BACKENDS = ("auto", "reference", "cuda")


class PagedAttention(nn.Module):
    """Multi-head attention (MHA, GQA, MQA) over a paged KV cache.

    Inputs are flattened over the batch: query [num_tokens, num_heads * head_size], key and value
    [num_tokens, num_kv_heads * head_size]. ``kv_cache`` is (key_cache, value_cache), each
    [num_blocks, block_size, num_kv_heads, head_size], or None during a profiling run (then no
    cache is written and attention runs over the new tokens only).

    ``sliding_window`` W (Mistral, Qwen2, Gemma): each query sees only the last W positions, its
    own included (HF's ``kv_idx > q_idx - W``); None attends to the whole context.

    ``logits_soft_cap`` c (Gemma 2): the scaled scores become ``c * tanh(scores / c)`` before
    masking and softmax; None leaves them as they are.

    ``backend``: one of BACKENDS. "auto" (default) picks per call: the cuda backend when the
    tensors are on a CUDA device and cacheflow_kernels.cuda_available(), else the reference
    backend. "cuda" raises ValueError when cacheflow_kernels has no CUDA.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: Optional[int] = None, backend: str = "auto",
                 sliding_window: Optional[int] = None,
                 logits_soft_cap: Optional[float] = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive integer or None, "
                             f"got {sliding_window!r}")
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be a positive number or None, "
                             f"got {logits_soft_cap!r}")
        self.sliding_window = sliding_window
        self.logits_soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cuda" and not cuda.available():
            raise ValueError("attention backend 'cuda' needs cacheflow_kernels with CUDA, but "
                             "cacheflow_kernels.cuda_available() is False (no CUDA device, or "
                             "the kernel library is missing); use backend='auto' or 'reference'")
        if backend == "cuda" and not cuda.supports_head_size(head_size):
            raise ValueError(f"attention backend 'cuda' supports head sizes "
                             f"{cuda.head_sizes()}, got {head_size}; use "
                             f"backend='auto' or 'reference'")
        self.backend = backend

    def backend_for(self, query: torch.Tensor) -> ModuleType:
        """The backend module (cuda or reference) that runs a step on ``query``'s device."""
        if self.backend == "reference":
            return reference
        if self.backend == "cuda":
            if not query.is_cuda:
                raise ValueError(f"attention backend 'cuda' needs CUDA tensors, got a tensor on "
                                 f"{query.device}")
            return cuda
        if query.is_cuda and cuda.available() and cuda.supports_head_size(self.head_size):
            return cuda
        return reference

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: Optional[tuple[torch.Tensor, torch.Tensor]],
                input_metadata: InputMetadata) -> torch.Tensor:
        """Returns the attention output [num_tokens, num_heads * head_size]."""
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_size)
        k = key.view(num_tokens, self.num_kv_heads, self.head_size)
        v = value.view(num_tokens, self.num_kv_heads, self.head_size)
        if kv_cache is None:
            out = _attend_without_cache(q, k, v, input_metadata, self.scale,
                                        self.sliding_window, self.logits_soft_cap)
        else:
            key_cache, value_cache = kv_cache
            backend = self.backend_for(q)
            backend.reshape_and_cache(k, v, key_cache, value_cache, input_metadata.slot_mapping)
            out = backend.paged_attention(q, key_cache, value_cache, input_metadata, self.scale,
                                          sliding_window=self.sliding_window,
                                          logits_soft_cap=self.logits_soft_cap)
        return out.view(num_tokens, self.num_heads * self.head_size)


def _attend_without_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          metadata: InputMetadata, scale: float,
                          sliding_window: Optional[int] = None,
                          logits_soft_cap: Optional[float] = None) -> torch.Tensor:
    """Causal attention over only the new tokens of each sequence (profiling runs)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    start = 0
    for q_len in metadata.query_lens:
        qs = q[start:start + q_len].transpose(0, 1)
        ks = k[start:start + q_len].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:start + q_len].repeat_interleave(group, dim=1).transpose(0, 1)
        pos = torch.arange(q_len, device=q.device)
        diff = pos[:, None] - pos[None, :]
        mask = diff >= 0
        if sliding_window is not None:
            mask = mask & (diff < sliding_window)
        if logits_soft_cap is not None:
            # SDPA has no soft-capping: the scores are formed here.
            scores = reference.soft_cap((qs.float() @ ks.float().transpose(-1, -2)) * scale,
                                        logits_soft_cap).masked_fill(~mask, float("-inf"))
            res = (torch.softmax(scores, dim=-1) @ vs.float()).to(q.dtype)
        elif sliding_window is None:
            res = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                   scale=scale)
        else:
            res = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask,
                                                                   scale=scale)
        out[start:start + q_len] = res.transpose(0, 1)
        start += q_len
    return out
