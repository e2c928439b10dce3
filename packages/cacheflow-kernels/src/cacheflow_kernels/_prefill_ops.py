"""Attention over the paged KV cache for prefill steps (whole prompts, prefix-cached prompts and
prefill chunks alike)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from . import _checks as C
from ._lib import get_function

_OP = "paged_prefill_attention"
_TOKENS = ("num_tokens", "num_heads", "head_size")
_CACHE = ("num_blocks", "block_size", "num_kv_heads", "head_size")
_CHECKS = C.CheckMemo()

#: Largest head size paged_prefill_attention accepts (any head size from 1 up to it works).
PAGED_PREFILL_MAX_HEAD_SIZE = 256

#: Head sizes with a tensor-core kernel for float16 and bfloat16 (others: CUDA cores).
PAGED_PREFILL_TENSOR_CORE_HEAD_SIZES = (64, 80, 96, 112, 128, 256)


def _check_scalars(
    scale: Any, max_query_len: Any, sliding_window: Any
) -> tuple[float, int, int]:
    """``(scale, max_query_len or -1, sliding_window or 0)`` after checking each."""
    op = _OP
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise C.arg_error(op, "scale", "a real number", type(scale).__name__)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0.0):
        raise C.arg_error(op, "scale", "a finite number > 0", repr(scale))
    if max_query_len is None:
        max_query_len = -1
    elif isinstance(max_query_len, bool) or not isinstance(max_query_len, numbers.Integral):
        raise C.arg_error(op, "max_query_len", "an int or None", type(max_query_len).__name__)
    elif max_query_len < 0:
        raise C.arg_error(op, "max_query_len", ">= 0 (or None)", str(max_query_len))
    if sliding_window is None:
        sliding_window = 0
    elif isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral):
        raise C.arg_error(op, "sliding_window", "an int or None", type(sliding_window).__name__)
    elif sliding_window < 1:
        raise C.arg_error(op, "sliding_window", ">= 1 (or None)", str(sliding_window))
    return scale, int(max_query_len), int(sliding_window)


def _validate_paged_prefill_attention(
    out: Any, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
    query_start_loc: Any, context_lens: Any, scale: Any, max_query_len: Any,
    sliding_window: Any,
) -> tuple[float, int, int]:
    op = _OP
    args = {
        "out": out, "query": query, "key_cache": key_cache, "value_cache": value_cache,
        "block_tables": block_tables, "query_start_loc": query_start_loc,
        "context_lens": context_lens,
    }
    # Shapes and dtypes.
    C.check_shape(op, "query", query, _TOKENS, (None, None, None))
    C.check_dtype(op, "query", query, C.FLOAT_KV_DTYPES)
    num_tokens, num_heads, head_size = C.shape_of(query)
    C.check_shape(op, "out", out, _TOKENS, (num_tokens, num_heads, head_size))
    C.check_same_dtype(op, "out", out, "query", query)
    C.check_shape(op, "key_cache", key_cache, _CACHE, (None, None, None, head_size))
    C.check_cache_dtype(op, "key_cache", key_cache, "query", query)
    num_blocks, block_size, num_kv_heads, _ = C.shape_of(key_cache)
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise C.arg_error(
            op, "key_cache",
            f"of shape [num_blocks, block_size, num_kv_heads, head_size] with num_kv_heads "
            f"dividing num_heads={num_heads}",
            f"[{num_blocks}, {block_size}, {num_kv_heads}, {head_size}]",
        )
    if block_size < 1:
        raise C.arg_error(op, "key_cache", "of block_size >= 1",
                          f"[{num_blocks}, {block_size}, {num_kv_heads}, {head_size}]")
    C.check_shape(
        op, "value_cache", value_cache, _CACHE, (num_blocks, block_size, num_kv_heads, head_size)
    )
    C.check_same_dtype(op, "value_cache", value_cache, "key_cache", key_cache)
    C.check_shape(op, "block_tables", block_tables, ("num_seqs", "max_blocks_per_seq"),
                  (None, None))
    C.check_dtype(op, "block_tables", block_tables, ("int32",))
    num_seqs = C.shape_of(block_tables)[0]
    C.check_shape(op, "query_start_loc", query_start_loc, ("num_seqs + 1",), (num_seqs + 1,))
    C.check_dtype(op, "query_start_loc", query_start_loc, ("int32",))
    C.check_shape(op, "context_lens", context_lens, ("num_seqs",), (num_seqs,))
    C.check_dtype(op, "context_lens", context_lens, ("int32",))
    # Sizes the kernels index.
    if not 1 <= head_size <= PAGED_PREFILL_MAX_HEAD_SIZE:
        raise C.arg_error(op, "query",
                          f"of head_size between 1 and {PAGED_PREFILL_MAX_HEAD_SIZE}",
                          f"shape [{num_tokens}, {num_heads}, {head_size}]")
    scale, max_query_len, sliding_window = _check_scalars(
        scale, max_query_len, sliding_window
    )
    # Memory layout.
    for name, x in args.items():
        if name == "query":
            C.check_row_strided(op, name, x)  # its rows may be strided (a fused QKV output)
        else:
            C.check_contiguous(op, name, x)
    # Device last.
    C.check_cuda(op, "query", query)
    for name, x in args.items():
        if name != "query":
            C.check_same_device(op, name, x, "query", query)
    return scale, int(max_query_len), int(sliding_window)


def paged_prefill_attention(
    out: Any,
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    query_start_loc: Any,
    context_lens: Any,
    scale: float,
    max_query_len: int | None = None,
    sliding_window: int | None = None,
    *,
    k_scale: Any = 1.0,
    v_scale: Any = 1.0,
    logits_soft_cap: float | None = None,
) -> None:
    """Causal attention of a ragged batch of new tokens over each sequence's paged KV cache.

    Sequence ``i`` contributes ``q_len_i = query_start_loc[i+1] - query_start_loc[i]`` new
    tokens, the rows ``query_start_loc[i]:query_start_loc[i+1]`` of ``query``, and has
    ``context_lens[i]`` tokens in all (tokens cached before plus the new ones, so
    ``context_lens[i] >= q_len_i``). New token ``j`` sits at position
    ``context_lens[i] - q_len_i + j`` and attends to the keys at positions ``0`` up to and
    including its own (only the last ``sliding_window`` of them when that is given)::

        out[t, h] = softmax_k(scale * query[t, h] . K[k, h // group]) @ V[., h // group]

    (with ``logits_soft_cap=cap`` each score ``x`` becomes ``cap * tanh(x / cap)`` first; FP8
    caches stand for ``key_cache * k_scale`` and ``value_cache * v_scale``)

    where ``group = num_heads // num_kv_heads`` (MHA, GQA and MQA) and the key/value of position
    ``k`` is ``key_cache[block_tables[i, k // block_size], k % block_size]``. Every K/V is read
    from the cache: write the new tokens' keys and values with :func:`reshape_and_cache` first.
    Whole prompts (``context_lens == q_len``), prompts after a cached prefix and prefill chunks
    (``context_lens > q_len``) all take this one call; so do decode rows (``q_len == 1``), though
    the decode kernel suits those better.

    Args:
        out: ``[num_tokens, num_heads, head_size]``, dtype of ``query``; written in place (rows
            of tokens of no sequence, past ``query_start_loc[-1]``, are left untouched).
        query: ``[num_tokens, num_heads, head_size]``, float16, bfloat16 or float32;
            ``head_size <= 256``. Its token rows may be strided (each row's
            ``[num_heads, head_size]`` block contiguous, e.g. the query columns of a fused QKV
            projection's output), so no copy is needed; the tensor-core kernels need the row
            stride to be a multiple of 16 bytes (else the CUDA-core kernel runs).
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_size]``, dtype of ``query``
            or an FP8 E4M3 cache (``torch.float8_e4m3fn``, or ``uint8`` holding its bytes);
            ``num_kv_heads`` divides ``num_heads``. Any ``block_size``.
        value_cache: same shape and dtype as ``key_cache``.
        block_tables: int32 ``[num_seqs, max_blocks_per_seq]``; entries past a sequence's last
            block are never read.
        query_start_loc: int32 ``[num_seqs + 1]``, cumulative query lengths (cu_seqlens):
            ``0, q_len_0, q_len_0 + q_len_1, ...``.
        context_lens: int32 ``[num_seqs]``.
        scale: softmax scale (usually ``head_size ** -0.5``); finite and > 0.
        max_query_len: an upper bound of the longest ``q_len_i`` (host int), which sizes the
            grid; ``None`` uses ``num_tokens`` (always safe, but launches idle tiles for every
            sequence: pass it when known). Queries longer than it are not computed. For CUDA
            graphs, capture with a bound that covers every replay.
        sliding_window: ``W >= 1`` limits each query to the last ``W`` positions, its own
            included (keys ``position - W + 1 .. position``; Mistral, Qwen2); ``None``: the
            whole context. Key tiles wholly outside every row's window are skipped.
        k_scale, v_scale: dequantization scales of FP8 caches (a float, or a 1-element tensor
            read once with ``.item()``); 1.0 for caches of ``query``'s dtype.
        logits_soft_cap: None, or ``cap > 0``: soft-capped scores (Gemma 2).

    Numerics: fp32 accumulation and an online (FlashAttention-2 style) softmax. float16 and
    bfloat16 use tensor cores for head sizes 64, 80, 96, 112, 128 and 256 (the attention weights
    are rounded to the input dtype before the P @ V product, as in FlashAttention); float32,
    other head sizes, and data pointers that are not 16-byte aligned take a CUDA-core kernel.
    A row that sees no key at all (only possible when ``context_lens[i] < q_len_i``) is zeros.

    All tensors but ``query`` are C-contiguous; all are CUDA tensors on one device (torch,
    CuPy, JAX: any DLPack array). The kernel runs on the caller's current stream and is
    CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape, memory layout or value;
            raised before the kernel library is loaded.
        TypeError: an argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    # Tensor checks are remembered per signature (see _checks.CheckMemo); the scalars, which
    # change from step to step (max_query_len), are checked on every call.
    _CHECKS.check(
        (out, query, key_cache, value_cache, block_tables, query_start_loc, context_lens), (),
        lambda: _validate_paged_prefill_attention(
            out, query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
            scale, max_query_len, sliding_window,
        ),
    )
    scale, max_q, window = _check_scalars(scale, max_query_len, sliding_window)
    fp8 = C.is_fp8_cache(key_cache)
    ks = C.scale_value(_OP, "k_scale", k_scale, fp8)
    vs = C.scale_value(_OP, "v_scale", v_scale, fp8)
    cap = C.soft_cap_value(_OP, logits_soft_cap)
    get_function(_OP)(
        out, query, C.as_kernel_cache(key_cache), C.as_kernel_cache(value_cache), block_tables,
        query_start_loc, context_lens, scale, max_q, window, ks, vs, cap,
    )
