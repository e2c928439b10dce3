"""Whole-block KV-cache operations: ``copy_blocks`` (copy-on-write on the GPU, all layers in one
launch) and ``swap_blocks`` (GPU <-> pinned CPU memory)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any

from . import _checks as C
from ._lib import get_function

_CACHE = ("num_blocks", "block_size", "num_kv_heads", "head_size")
_PAIRS = ("num_pairs", "2")
_HOST_DEVICES = ("cpu", "cuda_host")


def _check_pairs(op: str, block_mapping: Any) -> None:
    C.check_shape(op, "block_mapping", block_mapping, _PAIRS, (None, 2))
    C.check_dtype(op, "block_mapping", block_mapping, ("int64",))
    C.check_contiguous(op, "block_mapping", block_mapping)


def _layer_list(op: str, name: str, caches: Any) -> list[Any]:
    if not isinstance(caches, (list, tuple)):
        raise C.arg_error(op, name, "a list of tensors (one per layer)",
                          type(caches).__name__)
    return list(caches)


def _layers_match_fast(keys: list[Any], values: list[Any], block_mapping: Any) -> bool:
    """True when every layer is a torch tensor with the shape and dtype of ``keys[0]``,
    C-contiguous, on the CUDA device of ``block_mapping``: then none of the per-layer checks can
    fail. A cheap pass (attribute compares only) that spares the per-layer checks' cost (several
    microseconds per tensor: hundreds per call at 32+ layers, more than the copy itself); any
    other case (another framework, a mismatch) takes the full checks and their messages."""
    torch = sys.modules.get("torch")
    if torch is None or not keys:
        return False
    tensor = torch.Tensor
    ref = keys[0]
    if not isinstance(block_mapping, tensor) or not isinstance(ref, tensor):
        return False
    device = block_mapping.device
    if device.type != "cuda":
        return False
    shape, dtype = ref.shape, ref.dtype
    for t in itertools.chain(keys, values):
        if not (isinstance(t, tensor) and t.dtype == dtype and t.shape == shape
                and t.device == device and t.is_contiguous()):
            return False
    return True


def _validate_copy_blocks(key_caches: Any, value_caches: Any, block_mapping: Any) -> None:
    op = "copy_blocks"
    keys = _layer_list(op, "key_caches", key_caches)
    values = _layer_list(op, "value_caches", value_caches)
    if len(values) != len(keys):
        raise C.arg_error(op, "value_caches", f"a list of {len(keys)} tensors (one per layer, "
                          "like 'key_caches')", f"{len(values)} tensors")
    _check_pairs(op, block_mapping)
    if _layers_match_fast(keys, values, block_mapping):
        # The first layer still gets the full checks: 4-D, a KV-cache dtype.
        C.check_shape(op, "key_caches[0]", keys[0], _CACHE, (None, None, None, None))
        C.check_dtype(op, "key_caches[0]", keys[0], C.KV_CACHE_DTYPES)
        return
    named = [(f"key_caches[{i}]", t) for i, t in enumerate(keys)]
    named += [(f"value_caches[{i}]", t) for i, t in enumerate(values)]
    if named:
        ref_name, ref = named[0]
        C.check_shape(op, ref_name, ref, _CACHE, (None, None, None, None))
        C.check_dtype(op, ref_name, ref, C.KV_CACHE_DTYPES)
        ref_shape = C.shape_of(ref)
        for name, t in named:
            C.check_shape(op, name, t, _CACHE, ref_shape)
            C.check_same_dtype(op, name, t, ref_name, ref)
            C.check_contiguous(op, name, t)
    C.check_cuda(op, "block_mapping", block_mapping)
    for name, t in named:
        C.check_same_device(op, name, t, "block_mapping", block_mapping)


def copy_blocks(
    key_caches: Sequence[Any], value_caches: Sequence[Any], block_mapping: Any
) -> None:
    """Copy whole cache blocks inside the GPU KV cache of every layer (copy-on-write)::

        for layer in range(num_layers):
            for src, dst in block_mapping:
                key_caches[layer][dst] = key_caches[layer][src]
                value_caches[layer][dst] = value_caches[layer][src]

    All layers and pairs are copied by one kernel launch (one per 240 layers). The layers' data
    pointers are passed by value in the kernel's parameters: nothing is allocated or copied to
    the device first, so the call is CUDA-graph capturable (a captured graph keeps the pointers,
    the number of pairs and the mapping tensor's address; its contents may change).

    Args:
        key_caches: a list (or tuple) of per-layer tensors
            ``[num_blocks, block_size, num_kv_heads, head_size]``, float16, bfloat16, float32
            or an FP8 E4M3 cache (``torch.float8_e4m3fn`` or ``uint8``; blocks are copied
            bytewise); all with one shape and dtype, C-contiguous, on one CUDA device. Written
            in place.
        value_caches: a list of as many tensors, of the same shape and dtype.
        block_mapping: int64 ``[num_pairs, 2]`` on that CUDA device, contiguous: rows
            ``(src, dst)``. Pairs with ``src`` or ``dst`` outside ``[0, num_blocks)`` are
            skipped. A ``dst`` must not appear twice, nor as another pair's ``src``.

    Runs on the caller's current stream.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout, or the
            lists differ in length; raised before the kernel library is loaded.
        TypeError: a list element is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _validate_copy_blocks(key_caches, value_caches, block_mapping)
    keys, values = list(key_caches), list(value_caches)
    if keys and C.dtype_name(keys[0]) == "float8_e4m3fn":
        keys = [C.as_kernel_cache(t) for t in keys]
        values = [C.as_kernel_cache(t) for t in values]
    get_function("copy_blocks")(keys, values, block_mapping)


def _is_pinned(x: Any) -> bool | None:
    method = getattr(x, "is_pinned", None)
    if callable(method):
        return bool(method())
    return None  # cannot tell here; the library checks it


def _validate_swap_blocks(src: Any, dst: Any, block_mapping: Any) -> None:
    op = "swap_blocks"
    C._require_tensor(op, "src", src)
    src_shape = C.shape_of(src)
    if not src_shape:
        raise C.arg_error(op, "src", "a tensor [num_blocks, ...] of at least 1 dimension",
                          "a 0-D tensor")
    dims = ("num_blocks",) + tuple(f"d{i}" for i in range(1, len(src_shape)))
    C.check_shape(op, "dst", dst, dims, (None,) + src_shape[1:])
    C.check_same_dtype(op, "dst", dst, "src", src)
    _check_pairs(op, block_mapping)
    C.check_contiguous(op, "src", src)
    C.check_contiguous(op, "dst", dst)
    # Devices: block_mapping on the CPU; src/dst: a CUDA tensor and a pinned CPU tensor, or two
    # tensors on one CUDA device.
    mapping_dev, _ = C.device_of(block_mapping)
    if mapping_dev not in _HOST_DEVICES:
        raise C.arg_error(op, "block_mapping", "a CPU tensor",
                          f"a tensor on {C.device_str(block_mapping)}")
    src_dev, _ = C.device_of(src)
    dst_dev, _ = C.device_of(dst)
    for name, t, dev in (("src", src, src_dev), ("dst", dst, dst_dev)):
        if dev != "cuda" and dev not in _HOST_DEVICES:
            raise C.arg_error(op, name, "a CUDA or pinned CPU tensor",
                              f"a tensor on {C.device_str(t)}")
    if src_dev != "cuda" and dst_dev != "cuda":
        raise C.arg_error(op, "dst", "a CUDA tensor when 'src' is on the CPU",
                          f"a tensor on {C.device_str(dst)}")
    if src_dev == "cuda" and dst_dev == "cuda":
        C.check_same_device(op, "dst", dst, "src", src)
    for name, t, dev in (("src", src, src_dev), ("dst", dst, dst_dev)):
        if dev in _HOST_DEVICES and _is_pinned(t) is False:
            raise C.arg_error(op, name, "in pinned (page-locked) host memory, e.g. "
                              "torch.empty(..., pin_memory=True)", "pageable host memory")


def swap_blocks(src: Any, dst: Any, block_mapping: Any) -> None:
    """Copy whole blocks between a GPU cache and a pinned CPU cache (either direction)::

        for s, d in block_mapping:
            dst[d] = src[s]

    Pairs continuing a run (``(s, d), (s+1, d+1), ...``) merge. Several runs are copied by one
    kernel launch that reads and writes the pinned pages directly (mapped into the device's
    address space); a single run, a mapping that names a ``dst`` block twice, or overlapping
    ``src``/``dst`` take one ``cudaMemcpyAsync`` per run in order instead. Either way the work
    runs on the caller's current stream of the CUDA side's device and the call returns once it
    is queued (asynchronous with respect to the host, as the host memory is pinned).

    Args:
        src: ``[num_src_blocks, ...]`` (e.g. one layer's
            ``[num_blocks, block_size, num_kv_heads, head_size]`` cache), any dtype,
            C-contiguous.
        dst: ``[num_dst_blocks, ...]`` with the trailing shape and dtype of ``src``,
            C-contiguous. One of ``src``/``dst`` is a CUDA tensor and the other a CPU tensor in
            pinned memory (``pin_memory=True``), or both are on one CUDA device. Written.
        block_mapping: int64 ``[num_pairs, 2]`` CPU tensor, contiguous: rows
            ``(src_block, dst_block)``. Every index is checked against its cache before any copy
            is queued.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout, the host
            tensor is not pinned, or a block index is out of range (the latter from the library,
            before any copy).
        TypeError: an argument is not a tensor.
        RuntimeError: the kernel library is missing or a copy failed.
    """
    _validate_swap_blocks(src, dst, block_mapping)
    get_function("swap_blocks")(C.as_kernel_cache(src), C.as_kernel_cache(dst), block_mapping)
