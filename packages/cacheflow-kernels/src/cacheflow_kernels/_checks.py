"""Generic argument checks for the kernel wrappers, run before the library is loaded.

They read only DLPack-style attributes (``__dlpack_device__`` or ``.device``, ``.dtype``,
``.shape``, ``.is_contiguous()`` or ``.flags``), so they work for torch, CuPy, JAX and NumPy arrays
without importing any of them, and on machines without CUDA or without the built library.

Every failure is a ``ValueError`` of the form
``"<op>: argument '<name>' must be <expected>, got <actual>"``.
Wrappers check shapes, dtypes and contiguity first and the device last, so a structural mistake
is reported the same way on any device.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

_R = TypeVar("_R")

#: Activation / KV-cache dtypes the kernels accept.
FLOAT_KV_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
#: Dtypes of an FP8 E4M3 KV cache: torch's float8_e4m3fn, or uint8 holding its bytes.
FP8_CACHE_DTYPES: tuple[str, ...] = ("float8_e4m3fn", "uint8")
#: Every KV-cache dtype: the activation dtypes and the FP8 cache.
KV_CACHE_DTYPES: tuple[str, ...] = FLOAT_KV_DTYPES + FP8_CACHE_DTYPES

# DLPack DLDeviceType codes -> names.
_DLPACK_DEVICE_NAMES = {
    1: "cpu",
    2: "cuda",
    3: "cuda_host",
    4: "opencl",
    7: "vulkan",
    8: "metal",
    9: "vpi",
    10: "rocm",
    11: "rocm_host",
    12: "ext_dev",
    13: "cuda_managed",
    14: "oneapi",
    15: "webgpu",
    16: "hexagon",
    17: "maia",
}


def arg_error(op: str, name: str, expected: str, got: str) -> ValueError:
    """The ``ValueError`` every check raises: names the op, the argument and what was expected."""
    return ValueError(f"{op}: argument '{name}' must be {expected}, got {got}")


def _require_tensor(op: str, name: str, x: Any) -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(
            f"{op}: argument '{name}' must be a tensor (torch.Tensor or another DLPack array), "
            f"got {type(x).__name__}"
        )


def device_of(x: Any) -> tuple[str, int | None]:
    """``(type, index)`` of a tensor's device, e.g. ``("cuda", 0)`` or ``("cpu", 0)``."""
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is not None:
        try:
            code, index = dlpack_device()
            code = int(code)
            return _DLPACK_DEVICE_NAMES.get(code, f"dlpack_device_type={code}"), int(index)
        except Exception:  # noqa: BLE001 - e.g. torch "meta" tensors: fall back to .device
            pass
    device = getattr(x, "device", None)
    dev_type = getattr(device, "type", None)
    if isinstance(dev_type, str):
        return dev_type, getattr(device, "index", None)
    return str(device), None


def device_str(x: Any) -> str:
    """``"cuda:0"``, ``"cpu"``: a tensor's device for error messages."""
    dev_type, index = device_of(x)
    return dev_type if dev_type == "cpu" or index is None else f"{dev_type}:{index}"


def dtype_name(x: Any) -> str:
    """The dtype as a framework-neutral name: ``"float16"``, ``"bfloat16"``, ``"int64"``, ..."""
    name = str(x.dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape as a tuple of ints."""
    return tuple(int(s) for s in x.shape)


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def is_contiguous(x: Any) -> bool:
    """True for a C-contiguous (row-major, dense) tensor; assumed True when it cannot be told."""
    method = getattr(x, "is_contiguous", None)
    if callable(method):
        return bool(method())
    flags = getattr(x, "flags", None)
    if flags is not None:
        c_contiguous = getattr(flags, "c_contiguous", None)
        if c_contiguous is not None:
            return bool(c_contiguous)
    return True  # e.g. JAX arrays, which are always dense


def check_ndim(op: str, name: str, x: Any, ndim: int, layout: str) -> None:
    """Require an ``ndim``-D tensor; ``layout`` (e.g. ``"[num_tokens, head_size]"``) is quoted."""
    _require_tensor(op, name, x)
    shape = shape_of(x)
    if len(shape) != ndim:
        raise arg_error(
            op, name, f"a {ndim}-D tensor {layout}",
            f"a {len(shape)}-D tensor of shape {_shape_str(shape)}",
        )


def check_dtype(op: str, name: str, x: Any, allowed: Sequence[str]) -> None:
    """Require one of the dtype names ``allowed`` (see :func:`dtype_name`)."""
    _require_tensor(op, name, x)
    got = dtype_name(x)
    if got not in allowed:
        expected = allowed[0] if len(allowed) == 1 else (
            ", ".join(allowed[:-1]) + " or " + allowed[-1]
        )
        raise arg_error(op, name, f"of dtype {expected}", got)


def check_same_dtype(op: str, name: str, x: Any, ref_name: str, ref: Any) -> None:
    """Require the dtype of the argument ``ref_name``."""
    _require_tensor(op, name, x)
    got, want = dtype_name(x), dtype_name(ref)
    if got != want:
        raise arg_error(op, name, f"of dtype {want} like '{ref_name}'", got)


def check_shape(
    op: str, name: str, x: Any, dims: Sequence[str], sizes: Sequence[int | None]
) -> None:
    """Require ``len(dims)`` dimensions whose sizes equal ``sizes`` where not None.

    ``dims`` names each dimension for the message, e.g. ``("num_blocks", "block_size")``.
    """
    layout = "[" + ", ".join(dims) + "]"
    check_ndim(op, name, x, len(dims), layout)
    shape = shape_of(x)
    if any(want is not None and got != want for got, want in zip(shape, sizes)):
        expected = ", ".join(
            dim if want is None else f"{dim}={want}" for dim, want in zip(dims, sizes)
        )
        raise arg_error(op, name, f"of shape [{expected}]", _shape_str(shape))


def check_contiguous(op: str, name: str, x: Any) -> None:
    """Require a C-contiguous tensor."""
    _require_tensor(op, name, x)
    if not is_contiguous(x):
        raise arg_error(
            op, name, "contiguous", f"a strided tensor of shape {_shape_str(shape_of(x))} "
            "(call .contiguous() first)",
        )


def row_stride(x: Any) -> int | None:
    """Elements between the rows (dim 0) of a 3-D tensor whose rows are dense ``[dim1, dim2]``
    blocks (e.g. a view of a fused QKV projection output), ``dim1 * dim2`` for a C-contiguous
    one; None for any other layout. Dims of size 1 may have any stride; arrays without
    ``.stride()`` count as dense only when C-contiguous."""
    shape = shape_of(x)
    inner = shape[1] * shape[2]
    if is_contiguous(x):
        return inner
    stride = getattr(x, "stride", None)
    if not callable(stride):
        return None
    s = tuple(stride())
    dense = (shape[2] <= 1 or s[2] == 1) and (shape[1] <= 1 or s[1] == shape[2])
    row = inner if shape[0] <= 1 else s[0]
    return row if dense and row >= inner else None


def check_row_strided(op: str, name: str, x: Any) -> None:
    """Require a 3-D tensor that is C-contiguous or whose rows are dense blocks of its last
    two dims (see :func:`row_stride`)."""
    _require_tensor(op, name, x)
    if row_stride(x) is None:
        shape = shape_of(x)
        strides = getattr(x, "stride", None)
        got = f"a strided tensor of shape {_shape_str(shape)}"
        if callable(strides):
            got += f" with strides {_shape_str(strides())}"
        raise arg_error(
            op, name, f"contiguous, or rows of contiguous [{shape[1]}, {shape[2]}] blocks",
            got,
        )


def check_cuda(op: str, name: str, x: Any) -> None:
    """Require a tensor in CUDA device memory."""
    _require_tensor(op, name, x)
    dev_type, _ = device_of(x)
    if dev_type != "cuda":
        raise arg_error(op, name, "a CUDA tensor", f"a tensor on {device_str(x)}")


def check_same_device(op: str, name: str, x: Any, ref_name: str, ref: Any) -> None:
    """Require the device (type and index) of the argument ``ref_name``."""
    _require_tensor(op, name, x)
    if device_of(x) != device_of(ref):
        raise arg_error(
            op, name, f"on the same device as '{ref_name}' ({device_str(ref)})", device_str(x)
        )


# ---- remembered checks --------------------------------------------------------------------------
#
# The checks above cost tens of microseconds of Python per call (DLPack device queries, shape
# tuples, ...), more than many kernels take on the GPU, so back-to-back eager calls would run at
# host speed. For plain torch tensors every tensor check depends only on each tensor's shape,
# dtype, device and strides, so a signature that passed an op's checks is remembered and a later
# call with the same signature skips them. Other array types (CuPy, JAX), tensor subclasses and
# calls that fail always take the full checks; so do swap_blocks' pinned-memory checks, which a
# signature cannot see.


def torch_signature(tensors: Sequence[Any], scalars: Sequence[Any] = ()) -> Hashable | None:
    """Hashable ``(shape, dtype, device, strides)`` of each tensor (None entries kept) and
    ``(type, value)`` of each scalar; None unless every tensor is a plain ``torch.Tensor``."""
    torch = sys.modules.get("torch")  # never imported here: a torch tensor implies torch loaded
    tensor_type = getattr(torch, "Tensor", None) if torch is not None else None
    if tensor_type is None:
        return None
    key: list[Any] = []
    for x in tensors:
        if x is None:
            key.append(None)
        elif type(x) is tensor_type:
            key.append((x.shape, x.dtype, x.device, x.stride()))
        else:
            return None
    for s in scalars:
        key.append((type(s), s))
    signature = tuple(key)
    try:
        hash(signature)
    except TypeError:
        return None
    return signature


class CheckMemo:
    """One op's checks, remembered per :func:`torch_signature` (at most ``maxsize`` of them)."""

    def __init__(self, maxsize: int = 256) -> None:
        self._maxsize = maxsize
        self._results: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._results)

    def clear(self) -> None:
        """Forget every remembered signature."""
        self._results.clear()

    def check(self, tensors: Sequence[Any], scalars: Sequence[Any],
              validate: Callable[[], _R]) -> _R:
        """``validate()``'s result: remembered for this signature, or computed (and remembered
        when it returns; a check that raises is never remembered)."""
        key = torch_signature(tensors, scalars)
        if key is not None:
            try:
                return self._results[key]
            except KeyError:
                pass
        result = validate()
        if key is not None:
            if len(self._results) >= self._maxsize:
                self._results.clear()
            self._results[key] = result
        return result


# ---- FP8 caches and their scales ----------------------------------------------------------------


def is_fp8_cache(x: Any) -> bool:
    """True for an FP8 E4M3 cache tensor (float8_e4m3fn or uint8)."""
    return dtype_name(x) in FP8_CACHE_DTYPES


def check_cache_dtype(op: str, name: str, x: Any, ref_name: str, ref: Any) -> None:
    """Require the dtype of the activation ``ref`` or an FP8 E4M3 cache dtype."""
    _require_tensor(op, name, x)
    got, want = dtype_name(x), dtype_name(ref)
    if got != want and got not in FP8_CACHE_DTYPES:
        raise arg_error(
            op, name, f"of dtype {want} like '{ref_name}' or an FP8 E4M3 cache "
            "(float8_e4m3fn or uint8)", got,
        )


def as_kernel_cache(x: Any) -> Any:
    """The tensor to hand the library for a cache: a torch float8_e4m3fn tensor goes as its
    uint8 view (same bytes; DLPack exporters differ in their float8 support), others as is."""
    if dtype_name(x) == "float8_e4m3fn" and hasattr(x, "view"):
        torch = sys.modules["torch"]
        return x.view(torch.uint8)
    return x


def scale_value(op: str, name: str, x: Any, fp8: bool) -> float:
    """A K/V cache scale as a float: a real number or a 1-element tensor (read once with
    ``.item()``, a device sync for a CUDA tensor: pass floats on hot paths). Finite and > 0, and
    1.0 unless the cache is FP8 (``fp8``)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        numel = 1
        for d in x.shape:
            numel *= int(d)
        if numel != 1:
            raise arg_error(op, name, "a float or a 1-element tensor",
                            f"a tensor of shape {_shape_str(shape_of(x))}")
        x = x.reshape(()).item() if hasattr(x, "reshape") else x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)) and not hasattr(x, "__float__"):
        raise arg_error(op, name, "a float or a 1-element tensor", type(x).__name__)
    value = float(x)
    if not (math.isfinite(value) and value > 0.0):
        raise arg_error(op, name, "a finite number > 0", repr(value))
    if not fp8 and value != 1.0:
        raise arg_error(op, name, "1.0 unless the caches are FP8 (the scale dequantizes them)",
                        repr(value))
    return value


def soft_cap_value(op: str, x: Any) -> float:
    """The logits soft cap as the library takes it: None -> 0.0 (none), else a finite float
    > 0."""
    if x is None:
        return 0.0
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise arg_error(op, "logits_soft_cap", "None or a float > 0", type(x).__name__)
    value = float(x)
    if not (math.isfinite(value) and value > 0.0):
        raise arg_error(op, "logits_soft_cap", "None or a finite number > 0", repr(value))
    return value
