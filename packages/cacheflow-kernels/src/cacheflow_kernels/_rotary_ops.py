"""Rotary position embeddings (neox and gpt-j styles, partial rotary), in place."""

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


def _check_rows(name: str, x: Any, num_tokens: int, head_size: int, heads: str) -> None:
    """A [num_tokens, heads * head_size] tensor whose last dimension is contiguous; its rows may
    be further apart (a slice of a fused qkv tensor)."""
    layout = f"[num_tokens, {heads} * head_size]"
    C.check_ndim(_OP, name, x, 2, layout)
    shape = C.shape_of(x)
    if shape[0] != num_tokens:
        raise C.arg_error(_OP, name, f"of shape [num_tokens={num_tokens}, {heads} * head_size]",
                          f"[{shape[0]}, {shape[1]}]")
    if shape[1] % head_size:
        raise C.arg_error(_OP, name, f"of shape {layout} with a last dimension divisible by "
                          f"head_size={head_size}", f"[{shape[0]}, {shape[1]}]")
    strides = _strides(x)
    if strides is None or C.is_contiguous(x):
        return
    if shape[1] > 1 and strides[1] != 1:
        raise C.arg_error(_OP, name, "contiguous in its last dimension (stride 1)",
                          f"strides {list(strides)} for shape [{shape[0]}, {shape[1]}]")
    if shape[0] > 1 and strides[0] < shape[1]:
        raise C.arg_error(_OP, name, f"of non-overlapping rows (row stride >= {shape[1]})",
                          f"row stride {strides[0]}")


def _validate(positions: Any, query: Any, key: Any, cos_sin_cache: Any, head_size: Any,
              is_neox: Any) -> None:
    C.check_shape(_OP, "positions", positions, ("num_tokens",), (None,))
    C.check_dtype(_OP, "positions", positions, ("int64",))
    (num_tokens,) = C.shape_of(positions)
    if isinstance(head_size, bool) or not hasattr(head_size, "__index__") or (
        operator.index(head_size) <= 0
    ):
        raise C.arg_error(_OP, "head_size", "a positive integer", repr(head_size))
    head_size = operator.index(head_size)
    if not isinstance(is_neox, bool):
        raise C.arg_error(_OP, "is_neox", "a bool", repr(is_neox))
    C.check_dtype(_OP, "query", query, C.FLOAT_KV_DTYPES)
    _check_rows("query", query, num_tokens, head_size, "num_heads")
    C.check_same_dtype(_OP, "key", key, "query", query)
    _check_rows("key", key, num_tokens, head_size, "num_kv_heads")
    C.check_ndim(_OP, "cos_sin_cache", cos_sin_cache, 2, "[max_position, rot_dim]")
    C.check_dtype(_OP, "cos_sin_cache", cos_sin_cache, ("float32",))
    rot_dim = C.shape_of(cos_sin_cache)[1]
    if rot_dim < 2 or rot_dim % 2 or rot_dim > head_size or rot_dim > 8192:
        raise C.arg_error(
            _OP, "cos_sin_cache", "of shape [max_position, rot_dim] with rot_dim even, >= 2 and "
            f"<= head_size={head_size} (and <= 8192)",
            "[" + ", ".join(map(str, C.shape_of(cos_sin_cache))) + "]",
        )
    C.check_contiguous(_OP, "positions", positions)
    C.check_contiguous(_OP, "cos_sin_cache", cos_sin_cache)
    C.check_cuda(_OP, "positions", positions)
    for name, x in (("query", query), ("key", key), ("cos_sin_cache", cos_sin_cache)):
        C.check_same_device(_OP, name, x, "positions", positions)


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
