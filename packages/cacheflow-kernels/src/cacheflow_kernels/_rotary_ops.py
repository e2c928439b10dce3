"""Rotary position embeddings (neox and gpt-j styles, partial rotary), in place; and the same
fused with the write of the keys and values into the paged KV cache."""

from __future__ import annotations

import operator
from typing import Any

from . import _checks as C
from ._lib import get_function

_OP = "rotary_embedding"


_CHECKS = C.CheckMemo()


def _strides(x: Any) -> tuple[int, ...] | None:
    """Element strides of a tensor (torch ``.stride()``, NumPy/CuPy byte ``.strides``); None when
    the framework does not tell (e.g. JAX, whose arrays are dense)."""
    stride = getattr(x, "stride", None)
    if callable(stride):
        try:
            return tuple(int(s) for s in stride())
        except TypeError:
            pass
    strides = getattr(x, "strides", None)
    itemsize = getattr(x, "itemsize", None) or getattr(getattr(x, "dtype", None), "itemsize", None)
    if strides is not None and itemsize:
        return tuple(int(s) // int(itemsize) for s in strides)
    return None


def _check_rows(name: str, x: Any, num_tokens: int, head_size: int, heads: str,
                op: str = _OP) -> None:
    """A [num_tokens, heads * head_size] tensor whose last dimension is contiguous; its rows may
    be further apart (a slice of a fused qkv tensor)."""
    layout = f"[num_tokens, {heads} * head_size]"
    C.check_ndim(op, name, x, 2, layout)
    shape = C.shape_of(x)
    if shape[0] != num_tokens:
        raise C.arg_error(op, name, f"of shape [num_tokens={num_tokens}, {heads} * head_size]",
                          f"[{shape[0]}, {shape[1]}]")
    if shape[1] % head_size:
        raise C.arg_error(op, name, f"of shape {layout} with a last dimension divisible by "
                          f"head_size={head_size}", f"[{shape[0]}, {shape[1]}]")
    strides = _strides(x)
    if strides is None or C.is_contiguous(x):
        return
    if shape[1] > 1 and strides[1] != 1:
        raise C.arg_error(op, name, "contiguous in its last dimension (stride 1)",
                          f"strides {list(strides)} for shape [{shape[0]}, {shape[1]}]")
    if shape[0] > 1 and strides[0] < shape[1]:
        raise C.arg_error(op, name, f"of non-overlapping rows (row stride >= {shape[1]})",
                          f"row stride {strides[0]}")


def _validate(positions: Any, query: Any, key: Any, cos_sin_cache: Any, head_size: Any,
              is_neox: Any, op: str = _OP, devices: bool = True) -> None:
    """Shapes, dtypes and layouts of the rotary arguments, then (``devices``) their devices."""
    C.check_shape(op, "positions", positions, ("num_tokens",), (None,))
    C.check_dtype(op, "positions", positions, ("int64",))
    (num_tokens,) = C.shape_of(positions)
    if isinstance(head_size, bool) or not hasattr(head_size, "__index__") or (
        operator.index(head_size) <= 0
    ):
        raise C.arg_error(op, "head_size", "a positive integer", repr(head_size))
    head_size = operator.index(head_size)
    if not isinstance(is_neox, bool):
        raise C.arg_error(op, "is_neox", "a bool", repr(is_neox))
    C.check_dtype(op, "query", query, C.FLOAT_KV_DTYPES)
    _check_rows("query", query, num_tokens, head_size, "num_heads", op)
    C.check_same_dtype(op, "key", key, "query", query)
    _check_rows("key", key, num_tokens, head_size, "num_kv_heads", op)
    C.check_ndim(op, "cos_sin_cache", cos_sin_cache, 2, "[max_position, rot_dim]")
    C.check_dtype(op, "cos_sin_cache", cos_sin_cache, ("float32",))
    rot_dim = C.shape_of(cos_sin_cache)[1]
    if rot_dim < 2 or rot_dim % 2 or rot_dim > head_size or rot_dim > 8192:
        raise C.arg_error(
            op, "cos_sin_cache", "of shape [max_position, rot_dim] with rot_dim even, >= 2 and "
            f"<= head_size={head_size} (and <= 8192)",
            "[" + ", ".join(map(str, C.shape_of(cos_sin_cache))) + "]",
        )
    C.check_contiguous(op, "positions", positions)
    C.check_contiguous(op, "cos_sin_cache", cos_sin_cache)
    if devices:
        _check_devices(op, positions, {"query": query, "key": key,
                                       "cos_sin_cache": cos_sin_cache})


def _check_devices(op: str, positions: Any, others: dict[str, Any]) -> None:
    C.check_cuda(op, "positions", positions)
    for name, x in others.items():
        C.check_same_device(op, name, x, "positions", positions)


def rotary_embedding(
    positions: Any, query: Any, key: Any, cos_sin_cache: Any, head_size: int, is_neox: bool
) -> None:
    """Apply rotary position embeddings to ``query`` and ``key`` in place.

    For each token ``t`` and head, with ``p = positions[t]``, ``rot_dim = cos_sin_cache.shape[1]``,
    ``cos = cos_sin_cache[p, :rot_dim // 2]`` and ``sin = cos_sin_cache[p, rot_dim // 2:]``
    (both rounded to the activation dtype first)::

        neox (is_neox=True):   x1, x2 = x[:rot_dim // 2], x[rot_dim // 2:rot_dim]
        gpt-j (is_neox=False): x1, x2 = x[0:rot_dim:2], x[1:rot_dim:2]
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin

    Features ``rot_dim:head_size`` of each head are left untouched (partial rotary). Each product
    and sum is rounded to the dtype, so results match the runtime's torch ``RotaryEmbedding``
    (whose cos/sin caches, concatenated, are ``cos_sin_cache``). Tokens whose position lies
    outside ``[0, max_position)`` are left untouched.

    Args:
        positions: int64 ``[num_tokens]``, contiguous.
        query: ``[num_tokens, num_heads * head_size]``, float16, bfloat16 or float32; rotated in
            place. The last dimension must be contiguous (stride 1); rows may be further apart,
            e.g. ``query = qkv[:, :q_size]`` of a fused ``qkv`` tensor (the row stride is read
            from the tensor's strides).
        key: ``[num_tokens, num_kv_heads * head_size]``, dtype of ``query``; same rules.
        cos_sin_cache: float32 ``[max_position, rot_dim]``, contiguous; row ``p`` is
            ``[cos(p * inv_freq) | sin(p * inv_freq)]`` (``rot_dim // 2`` each). ``rot_dim``
            is even and ``<= head_size`` (and ``<= 8192``).
        head_size: features per head, a positive int.
        is_neox: True for neox style (LLaMA, GPT-NeoX), False for gpt-j style (interleaved).

    All tensors are on one CUDA device. ``query`` and ``key`` must not overlap. Runs on the
    caller's current stream; CUDA-graph capturable. The environment variable
    ``CACHEFLOW_ROTARY`` (read at every call) picks the kernel for A/B measurements: unset, the
    pipelined persistent kernel where it applies and gives every CTA at least two tokens, else
    the block-per-token kernel; ``block``, ``warp`` or ``pipelined`` force one, each falling back
    to ``block`` where it does not apply. All give identical results.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape, strides or value; raised
            before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _CHECKS.check(
        (positions, query, key, cos_sin_cache), (head_size, is_neox),
        lambda: _validate(positions, query, key, cos_sin_cache, head_size, is_neox),
    )
    get_function(_OP)(positions, query, key, cos_sin_cache, operator.index(head_size),
                      bool(is_neox))


_WITH_CACHE = "rotary_embedding_with_cache"
_CACHE_LAYOUT = ("num_blocks", "block_size", "num_kv_heads", "head_size")
_WITH_CACHE_CHECKS = C.CheckMemo()


def _validate_with_cache(positions: Any, query: Any, key: Any, value: Any, cos_sin_cache: Any,
                         head_size: Any, is_neox: Any, key_cache: Any, value_cache: Any,
                         slot_mapping: Any) -> None:
    op = _WITH_CACHE
    _validate(positions, query, key, cos_sin_cache, head_size, is_neox, op, devices=False)
    head_size = operator.index(head_size)
    C.check_dtype(op, "query", query, ("float16", "bfloat16"))
    if head_size % 16:
        raise C.arg_error(op, "head_size", "a multiple of 16", repr(head_size))
    rot_dim = C.shape_of(cos_sin_cache)[1]
    if rot_dim != head_size:
        raise C.arg_error(op, "cos_sin_cache", f"of shape [max_position, head_size={head_size}] "
                          "(every feature rotates; use rotary_embedding and reshape_and_cache "
                          "for partial rotary)", f"rot_dim {rot_dim}")
    num_tokens, width = C.shape_of(key)
    num_kv_heads = width // head_size
    C.check_same_dtype(op, "value", value, "query", query)
    _check_rows("value", value, num_tokens, head_size, "num_kv_heads", op)
    if C.shape_of(value)[1] != width:
        raise C.arg_error(op, "value", f"of the shape of 'key' [{num_tokens}, {width}]",
                          "[" + ", ".join(map(str, C.shape_of(value))) + "]")
    for name, t in (("query", query), ("key", key), ("value", value)):
        strides = _strides(t)
        if strides is not None and not C.is_contiguous(t) and num_tokens > 1 and strides[0] % 8:
            raise C.arg_error(op, name, "rows a multiple of 8 elements apart",
                              f"row stride {strides[0]}")
    C.check_shape(op, "key_cache", key_cache, _CACHE_LAYOUT,
                  (None, None, num_kv_heads, head_size))
    C.check_cache_dtype(op, "key_cache", key_cache, "query", query)
    num_blocks, block_size = C.shape_of(key_cache)[:2]
    C.check_shape(op, "value_cache", value_cache, _CACHE_LAYOUT,
                  (num_blocks, block_size, num_kv_heads, head_size))
    C.check_same_dtype(op, "value_cache", value_cache, "key_cache", key_cache)
    C.check_shape(op, "slot_mapping", slot_mapping, ("num_tokens",), (num_tokens,))
    C.check_dtype(op, "slot_mapping", slot_mapping, ("int64",))
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        C.check_contiguous(op, name, t)
    _check_devices(op, positions, {
        "query": query, "key": key, "value": value, "cos_sin_cache": cos_sin_cache,
        "key_cache": key_cache, "value_cache": value_cache, "slot_mapping": slot_mapping})


def rotary_embedding_with_cache(
    positions: Any, query: Any, key: Any, value: Any, cos_sin_cache: Any, head_size: int,
    is_neox: bool, key_cache: Any, value_cache: Any, slot_mapping: Any, k_scale: Any = 1.0,
    v_scale: Any = 1.0,
) -> None:
    """:func:`rotary_embedding` of ``query`` and ``key``, then :func:`reshape_and_cache` of the
    rotated ``key`` and of ``value``, in one kernel.

    The results are exactly those of the two ops::

        rotary_embedding(positions, query, key, cos_sin_cache, head_size, is_neox)
        reshape_and_cache(key.view(-1, num_kv_heads, head_size),
                          value.view(-1, num_kv_heads, head_size),
                          key_cache, value_cache, slot_mapping, k_scale, v_scale)

    (``query`` and ``key`` rotated in place, each token's rotated key and its value stored at
    ``slot_mapping[t]``), but a decode step pays one launch and one position/slot latency
    instead of two, and reads each key once.

    Args:
        positions: int64 ``[num_tokens]``, contiguous.
        query: ``[num_tokens, num_heads * head_size]``, float16 or bfloat16; rotated in place.
        key: ``[num_tokens, num_kv_heads * head_size]``, dtype of ``query``; rotated in place.
        value: ``[num_tokens, num_kv_heads * head_size]``, dtype of ``query``.
            For all three the last dimension is contiguous and the rows may be further apart
            (slices of a fused qkv tensor), a multiple of 8 elements; the data 16-byte aligned.
        cos_sin_cache: float32 ``[max_position, head_size]``, contiguous (every feature rotates;
            partial rotary takes the two ops).
        head_size: features per head, a multiple of 16.
        is_neox: True for neox style, False for gpt-j style.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_size]``, dtype of
            ``query`` or FP8 E4M3 (``torch.float8_e4m3fn`` or ``uint8``), contiguous, 16-byte
            aligned; written in place.
        slot_mapping: int64 ``[num_tokens]``; a negative slot skips the token's cache writes.
        k_scale, v_scale: FP8 scales as in :func:`reshape_and_cache` (1.0 for caches of the
            query's dtype).

    All tensors are on one CUDA device. Runs on the caller's current stream; CUDA-graph
    capturable. On compute capability 9.0+ the kernel may start while the kernel before it on
    the stream finishes and reads ``positions``, ``slot_mapping`` and ``cos_sin_cache`` before
    it waits for that kernel (the activations and caches only after): those three must not be
    outputs of a cacheflow kernel launched just before this call (torch ops, copies and
    anything earlier are fine).

    Raises:
        ValueError: an argument has the wrong device, dtype, shape, layout or value (layouts
            are checked before the kernel library is loaded; a pointer that is not 16-byte
            aligned is reported by the library).
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _WITH_CACHE_CHECKS.check(
        (positions, query, key, value, cos_sin_cache, key_cache, value_cache, slot_mapping),
        (head_size, is_neox),
        lambda: _validate_with_cache(positions, query, key, value, cos_sin_cache, head_size,
                                     is_neox, key_cache, value_cache, slot_mapping),
    )
    fp8 = C.is_fp8_cache(key_cache)
    ks = C.scale_value(_WITH_CACHE, "k_scale", k_scale, fp8)
    vs = C.scale_value(_WITH_CACHE, "v_scale", v_scale, fp8)
    get_function(_WITH_CACHE)(
        positions, query, key, value, cos_sin_cache, operator.index(head_size), bool(is_neox),
        C.as_kernel_cache(key_cache), C.as_kernel_cache(value_cache), slot_mapping, ks, vs,
    )
