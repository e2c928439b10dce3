"""KV-cache operations: writing new keys and values into the paged cache."""

from __future__ import annotations

from typing import Any

from . import _checks as C
from ._lib import get_function

_TOKENS = ("num_tokens", "num_kv_heads", "head_size")
_CACHE = ("num_blocks", "block_size", "num_kv_heads", "head_size")


_CHECKS = C.CheckMemo()


def _validate_reshape_and_cache(
    key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any
) -> None:
    op = "reshape_and_cache"
    args = {
        "key": key, "value": value, "key_cache": key_cache, "value_cache": value_cache,
        "slot_mapping": slot_mapping,
    }
    # Shapes and dtypes.
    C.check_shape(op, "key", key, _TOKENS, (None, None, None))
    C.check_dtype(op, "key", key, C.FLOAT_KV_DTYPES)
    num_tokens, num_heads, head_size = C.shape_of(key)
    C.check_shape(op, "value", value, _TOKENS, (num_tokens, num_heads, head_size))
    C.check_same_dtype(op, "value", value, "key", key)
    C.check_shape(op, "key_cache", key_cache, _CACHE, (None, None, num_heads, head_size))
    C.check_cache_dtype(op, "key_cache", key_cache, "key", key)
    num_blocks, block_size = C.shape_of(key_cache)[:2]
    C.check_shape(
        op, "value_cache", value_cache, _CACHE, (num_blocks, block_size, num_heads, head_size)
    )
    C.check_same_dtype(op, "value_cache", value_cache, "key_cache", key_cache)
    C.check_shape(op, "slot_mapping", slot_mapping, ("num_tokens",), (num_tokens,))
    C.check_dtype(op, "slot_mapping", slot_mapping, ("int64",))
    # Memory layout.
    for name, x in args.items():
        if name in ("key", "value"):
            C.check_row_strided(op, name, x)  # token rows may be strided (a fused QKV output)
        else:
            C.check_contiguous(op, name, x)
    # Device last.
    C.check_cuda(op, "key", key)
    for name, x in args.items():
        if name != "key":
            C.check_same_device(op, name, x, "key", key)


def reshape_and_cache(
    key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any,
    k_scale: Any = 1.0, v_scale: Any = 1.0,
) -> None:
    """Write the keys and values of new tokens into the paged KV cache, in place.

    For every token ``t`` with ``slot = slot_mapping[t] >= 0``::

        key_cache[slot // block_size, slot % block_size] = key[t]
        value_cache[slot // block_size, slot % block_size] = value[t]

    With FP8 E4M3 caches the stored values are ``key[t] / k_scale`` and ``value[t] / v_scale``
    rounded to the nearest E4M3 number, saturating at +-448 (what ``paged_attention`` and
    ``paged_prefill_attention`` multiply back with the same scales).

    Args:
        key: ``[num_tokens, num_kv_heads, head_size]``, float16, bfloat16 or float32; token
            rows may be strided.
        value: ``[num_tokens, num_kv_heads, head_size]``, dtype of ``key``; token rows may be
            strided.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_size]``, dtype of ``key``, or
            an FP8 E4M3 cache (``torch.float8_e4m3fn``, or ``uint8`` holding its bytes);
            written in place.
        value_cache: same shape and dtype as ``key_cache``; written in place.
        slot_mapping: int64 ``[num_tokens]``; ``slot = block_number * block_size + offset``.
            A negative slot skips the token (padding). Slots ``>= num_blocks * block_size`` are
            skipped too, but callers must not rely on it.
        k_scale, v_scale: the FP8 quantization scales of this layer's keys and values (a float
            or a 1-element tensor, finite and > 0; a tensor is read with ``.item()``); must be
            1.0 for caches of ``key``'s dtype.

    All tensors are C-contiguous CUDA tensors on one device (torch, CuPy, JAX: any DLPack
    array), except that ``key`` and ``value`` may have strided token rows (each token's
    ``[num_kv_heads, head_size]`` contiguous, e.g. views of a fused QKV projection output; no
    copy is made). The kernel runs on the caller's current stream (torch's current stream for torch
    tensors) and is CUDA-graph capturable. Slots should be distinct; for duplicates, which
    token's row lands is unspecified.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout; raised
            before the kernel library is loaded.
        TypeError: an argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _CHECKS.check(
        (key, value, key_cache, value_cache, slot_mapping), (),
        lambda: _validate_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping),
    )
    fp8 = C.is_fp8_cache(key_cache)
    ks = C.scale_value("reshape_and_cache", "k_scale", k_scale, fp8)
    vs = C.scale_value("reshape_and_cache", "v_scale", v_scale, fp8)
    get_function("reshape_and_cache")(
        key, value, C.as_kernel_cache(key_cache), C.as_kernel_cache(value_cache), slot_mapping,
        ks, vs,
    )
