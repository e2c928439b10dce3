"""The cuda attention backend: the kernels of cacheflow_kernels on CUDA tensors.

Same functions and layouts as the reference backend (reference.py), so PagedAttention can use
either:

- ``reshape_and_cache``: ``cacheflow_kernels.reshape_and_cache``.
- ``paged_attention``: decode steps (every sequence has one new token) go to
  ``cacheflow_kernels.paged_attention`` (:func:`decode`); every other step (prompts, chunked or
  prefix-cached prefills, mixed batches) goes to :func:`prefill`, except that the leading
  decodes of a mixed step (the scheduler puts its running decodes first) go to :func:`decode`:
  the prefill kernel would give each of them a whole tile of query rows with one row used.
  ``CACHEFLOW_MIXED_DECODE_KERNEL=0`` sends whole mixed steps to :func:`prefill` (for
  comparisons).
- :func:`decode_with_rotary_cache`: a decode step's rotary embedding and cache write inside the
  decode kernel (``cacheflow_kernels.paged_attention_with_rotary_cache``; the rotary layers try
  it on small decode grids, see ``kernels.attention_rotary_fusion_wanted``).
- :func:`prefill`: ``cacheflow_kernels.paged_prefill_attention`` (any head size up to 256, any
  block size, sliding window included); steps with ALiBi, which that kernel lacks, run the
  reference backend.

Shapes the decode kernel does not cover (head sizes other than 64, 80, 96, 112, 128, 256;
block sizes other than 8, 16, 32) fall back to the reference backend.

Caches in the query's dtype or FP8 E4M3 (``torch.float8_e4m3fn``, with per-layer ``k_scale`` /
``v_scale``) take the same paths; ``logits_soft_cap`` goes to the kernels as is.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

import cacheflow_kernels
from cacheflow_runtime.attention import reference
from cacheflow_runtime.attention.metadata import InputMetadata
from cacheflow_runtime.kernels import cuda_ready

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: paged_attention reads the query with 16-byte loads: its address and row stride must be
#: multiples of 16 bytes.
_QUERY_ALIGN = 16
#: Whether a mixed step's leading decodes run the decode kernel (see the module docstring).
_MIXED_DECODE_KERNEL = os.environ.get("CACHEFLOW_MIXED_DECODE_KERNEL", "1") != "0"


def _cache_dtype_ok(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """The kernels read caches of the query's dtype or FP8 E4M3."""
    return key_cache.dtype == query.dtype or key_cache.dtype == torch.float8_e4m3fn


def available() -> bool:
    """True when cacheflow_kernels has a CUDA device and its library loads (checked once)."""
    return cuda_ready()


def head_sizes() -> tuple[int, ...]:
    """Head sizes the decode kernel is compiled for."""
    return tuple(cacheflow_kernels.PAGED_ATTENTION_HEAD_SIZES)


def supports_head_size(head_size: int) -> bool:
    """Whether the decode kernel is compiled for this head size."""
    return head_size in cacheflow_kernels.PAGED_ATTENTION_HEAD_SIZES


def supports_decode(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether ``paged_attention`` can run a decode step with these tensors on the kernel."""
    return (query.is_cuda and query.dtype in _DTYPES and _cache_dtype_ok(query, key_cache)
            and supports_head_size(query.shape[-1])
            and key_cache.shape[1] in cacheflow_kernels.PAGED_ATTENTION_BLOCK_SIZES)


def is_decode(metadata: InputMetadata) -> bool:
    """Every sequence of the step has exactly one new token."""
    return metadata.num_seqs > 0 and all(q == 1 for q in metadata.query_lens)


def _dense_rows(x: torch.Tensor) -> bool:
    """Whether each row (dim 0) of a 3-D tensor is one dense run of its last two dims: the
    layout of q/k/v views into a fused QKV projection output, which the kernels take as is."""
    n, h, d = x.shape
    return (d <= 1 or x.stride(2) == 1) and (h <= 1 or x.stride(1) == d) \
        and (n <= 1 or x.stride(0) >= h * d)


def _token_rows(x: torch.Tensor, align: int = 1) -> torch.Tensor:
    """``x`` itself where the kernels read its strided token rows (dense rows; with ``align``,
    row stride and address multiples of that many bytes), else a contiguous copy."""
    if x.is_contiguous():
        return x
    if _dense_rows(x) and x.data_ptr() % align == 0 \
            and (x.shape[0] <= 1 or x.stride(0) * x.element_size() % align == 0):
        return x
    return x.contiguous()


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Writes key/value [num_tokens, num_kv_heads, head_size] into their cache slots (negative
    slots skipped), through the kernel; FP8 caches get ``key / k_scale`` and
    ``value / v_scale``. Views into a fused QKV output (strided token rows) are read in place."""
    cacheflow_kernels.reshape_and_cache(_token_rows(key), _token_rows(value), key_cache,
                                        value_cache, slot_mapping.contiguous(), k_scale, v_scale)


def decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           metadata: InputMetadata, scale: float, alibi_slopes: Optional[torch.Tensor] = None,
           sliding_window: Optional[int] = None,
           workspace: Optional[torch.Tensor] = None, k_scale: float = 1.0,
           v_scale: float = 1.0, logits_soft_cap: Optional[float] = None,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A decode step through ``cacheflow_kernels.paged_attention``.

    query: [num_seqs, num_heads, head_size] (one token per sequence); returns the same shape.
    ``metadata.max_context_len`` (a host int) sizes the kernel's split-K grid; ``workspace``
    (float32, see ``cacheflow_kernels.paged_attention_workspace_size``) avoids an allocation,
    e.g. under CUDA-graph capture. A query view into a fused QKV output (strided sequence rows)
    is read in place. The result goes to ``out`` (contiguous, the query's shape) when given,
    else to a new tensor.
    """
    query = _token_rows(query, _QUERY_ALIGN)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    cacheflow_kernels.paged_attention(
        out, query, key_cache, value_cache, metadata.block_tables.contiguous(),
        metadata.context_lens.contiguous(), scale,
        None if alibi_slopes is None else alibi_slopes.float().contiguous(),
        max_context_len=metadata.max_context_len, workspace=workspace,
        sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale,
        logits_soft_cap=logits_soft_cap)
    return out


def decode_with_rotary_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             key_cache: torch.Tensor, value_cache: torch.Tensor,
                             metadata: InputMetadata, scale: float, positions: torch.Tensor,
                             cos_sin_cache: Optional[torch.Tensor], is_neox: bool, *,
                             sliding_window: Optional[int] = None, k_scale: float = 1.0,
                             v_scale: float = 1.0,
                             logits_soft_cap: Optional[float] = None) -> Optional[torch.Tensor]:
    """A decode step's rotary embedding, cache write and attention in one kernel
    (``cacheflow_kernels.paged_attention_with_rotary_cache``; the caller decides whether to try,
    see :func:`kernels.attention_rotary_fusion_wanted`): query ``[n, num_heads * head_size]``,
    key and value ``[n, num_kv_heads * head_size]`` before the rotary embedding (views of a fused
    QKV output are read in place; nothing is modified). Returns the attention output ``[n,
    num_heads, head_size]``, or None having done nothing (not a decode step, layouts or a head
    grouping the kernel does not take): the caller then rotates, stores and attends as before."""
    if not is_decode(metadata):
        return None
    n = query.shape[0]
    head_size = key_cache.shape[-1]
    q = query.view(n, -1, head_size)
    k = key.view(n, -1, head_size)
    v = value.view(n, -1, head_size)
    if not supports_decode(q, key_cache) or q.dtype == torch.float32:
        return None
    for t in (q, k, v):
        if (not _dense_rows(t) or t.data_ptr() % 16 or t.dtype != q.dtype
                or (n > 1 and t.stride(0) % 8)):
            return None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ran = cacheflow_kernels.paged_attention_with_rotary_cache(
        out, q, k, v, key_cache, value_cache, metadata.block_tables.contiguous(),
        metadata.context_lens.contiguous(), positions, metadata.slot_mapping.contiguous(),
        cos_sin_cache, is_neox, scale, max_context_len=metadata.max_context_len,
        sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale,
        logits_soft_cap=logits_soft_cap)
    return out if ran else None


def decode_with_lse(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    max_context_len: int, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention through ``cacheflow_kernels.paged_attention`` that also returns each
    row's log-sum-exp (float32 [num_seqs, num_heads]); the reference backend's
    ``decode_with_lse`` contract. Shapes the kernel does not take run the reference backend."""
    if not supports_decode(query, key_cache):
        return reference.decode_with_lse(query, key_cache, value_cache, block_tables,
                                         context_lens, max_context_len, scale, k_scale, v_scale)
    query = _token_rows(query, _QUERY_ALIGN)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
    cacheflow_kernels.paged_attention(
        out, query, key_cache, value_cache, block_tables.contiguous(),
        context_lens.contiguous(), scale, None, max_context_len=max_context_len,
        k_scale=k_scale, v_scale=v_scale, lse=lse)
    return out, lse


def supports_prefill(query: torch.Tensor, key_cache: torch.Tensor,
                     alibi_slopes: Optional[torch.Tensor] = None,
                     sliding_window: Optional[int] = None) -> bool:
    """Whether :func:`prefill` runs on ``cacheflow_kernels.paged_prefill_attention``: CUDA
    tensors (caches of the query's dtype or FP8), head size at most
    ``PAGED_PREFILL_MAX_HEAD_SIZE``, no ALiBi (a sliding window is fine)."""
    return (alibi_slopes is None and query.is_cuda
            and query.dtype in _DTYPES and _cache_dtype_ok(query, key_cache)
            and query.shape[-1] <= cacheflow_kernels.PAGED_PREFILL_MAX_HEAD_SIZE)


def prefill(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            metadata: InputMetadata, scale: float, alibi_slopes: Optional[torch.Tensor] = None,
            sliding_window: Optional[int] = None, k_scale: float = 1.0, v_scale: float = 1.0,
            logits_soft_cap: Optional[float] = None,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Any step that is not a pure decode (some sequence has more than one new token).

    query: [num_tokens, num_heads, head_size]; returns the same shape. Runs
    ``cacheflow_kernels.paged_prefill_attention`` (prompts, prefix-cached prompts, prefill
    chunks and decode rows of a mixed batch in one launch; ``metadata.max_query_len``, a host
    int, sizes its grid) where :func:`supports_prefill`, else the reference backend. Rows past
    ``metadata.num_tokens`` (padding) come back as zeros. The result goes to ``out``
    (contiguous, the query's shape) when given, else to a new tensor.
    """
    if supports_prefill(query, key_cache, alibi_slopes, sliding_window):
        # Strided token rows (the query columns of a fused QKV output) are read in place; a
        # row stride off 16 bytes would cost the tensor cores, so such a query is copied.
        query = _token_rows(query, align=16)
        if out is None:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] > metadata.num_tokens:
            out[metadata.num_tokens:].zero_()
        cacheflow_kernels.paged_prefill_attention(
            out, query, key_cache, value_cache, metadata.block_tables.contiguous(),
            metadata.query_start_loc.contiguous(), metadata.context_lens.contiguous(), scale,
            max_query_len=metadata.max_query_len, sliding_window=sliding_window,
            k_scale=k_scale, v_scale=v_scale, logits_soft_cap=logits_soft_cap)
        return out
    kwargs: dict[str, Any] = {"k_scale": k_scale, "v_scale": v_scale}
    if sliding_window is not None:
        kwargs["sliding_window"] = sliding_window
    if logits_soft_cap is not None:
        kwargs["logits_soft_cap"] = logits_soft_cap
    result = reference.paged_attention(query, key_cache, value_cache, metadata, scale,
                                       alibi_slopes, **kwargs)
    if out is None:
        return result
    out.copy_(result)
    return out


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    metadata: InputMetadata, scale: float,
                    alibi_slopes: Optional[torch.Tensor] = None,
                    sliding_window: Optional[int] = None, k_scale: float = 1.0,
                    v_scale: float = 1.0,
                    logits_soft_cap: Optional[float] = None) -> torch.Tensor:
    """Attention of each sequence's new tokens over its cached context (the reference
    backend's contract): decode steps on the decode kernel; a mixed step's leading decodes on
    the decode kernel and the rest through :func:`prefill`; the others through
    :func:`prefill`."""
    decodes_fit = supports_decode(query, key_cache)
    if is_decode(metadata) and decodes_fit:
        return decode(query, key_cache, value_cache, metadata, scale, alibi_slopes,
                      sliding_window, k_scale=k_scale, v_scale=v_scale,
                      logits_soft_cap=logits_soft_cap)
    split = metadata.leading_decodes if decodes_fit and _MIXED_DECODE_KERNEL else None
    if split is None:
        return prefill(query, key_cache, value_cache, metadata, scale, alibi_slopes,
                       sliding_window, k_scale=k_scale, v_scale=v_scale,
                       logits_soft_cap=logits_soft_cap)
    n = split.num_decodes
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    decode(query[:n], key_cache, value_cache, split.decodes, scale, alibi_slopes,
           sliding_window, k_scale=k_scale, v_scale=v_scale, logits_soft_cap=logits_soft_cap,
           out=out[:n])
    prefill(query[n:], key_cache, value_cache, split.rest, scale, alibi_slopes, sliding_window,
            k_scale=k_scale, v_scale=v_scale, logits_soft_cap=logits_soft_cap, out=out[n:])
    return out
