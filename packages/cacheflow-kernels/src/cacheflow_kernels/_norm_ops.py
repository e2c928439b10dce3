"""RMS layer norm (LLaMA): ``rms_norm`` and the residual-fused ``fused_add_rms_norm``."""

from __future__ import annotations

import math
from typing import Any

from . import _checks as C
from ._lib import get_function

_ROWS = ("num_tokens", "hidden")
_RMS_NORM_CHECKS = C.CheckMemo()
_FUSED_ADD_RMS_NORM_CHECKS = C.CheckMemo()


def _check_eps(op: str, eps: Any) -> None:
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool)
    if not ok or not math.isfinite(eps) or eps < 0:
        raise C.arg_error(op, "eps", "a finite float >= 0", repr(eps))


def _validate(op: str, named: dict[str, Any], weight: Any, eps: Any) -> None:
    """``named``: the [num_tokens, hidden] tensors, ``x`` first."""
    x = named["x"]
    C.check_shape(op, "x", x, _ROWS, (None, None))
    C.check_dtype(op, "x", x, C.FLOAT_KV_DTYPES)
    num_tokens, hidden = C.shape_of(x)
    for name, t in named.items():
        if name != "x":
            C.check_shape(op, name, t, _ROWS, (num_tokens, hidden))
            C.check_same_dtype(op, name, t, "x", x)
    C.check_shape(op, "weight", weight, ("hidden",), (hidden,))
    C.check_same_dtype(op, "weight", weight, "x", x)
    _check_eps(op, eps)
    args = {**named, "weight": weight}
    for name, t in args.items():
        C.check_contiguous(op, name, t)
    C.check_cuda(op, "x", x)
    for name, t in args.items():
        if name != "x":
            C.check_same_device(op, name, t, "x", x)


def rms_norm(out: Any, x: Any, weight: Any, eps: float) -> None:
    """RMS norm of every token, written to ``out``, computed like HF ``LlamaRMSNorm``::

        h = x.float()
        out = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    The sum of squares is reduced in float32; the product with ``weight`` is rounded once to
    the dtype (like torch's multiply of two float16/bfloat16 tensors).

    Args:
        out: ``[num_tokens, hidden]``, dtype of ``x``; written. May be ``x`` itself (in place).
        x: ``[num_tokens, hidden]``, float16, bfloat16 or float32.
        weight: ``[hidden]``, dtype of ``x``.
        eps: a finite float >= 0 added to the mean square.

    All tensors are C-contiguous CUDA tensors on one device (torch, CuPy, JAX: any DLPack
    array). Any hidden size works; rows of up to 16k elements (32k for 16-bit dtypes) in 16-byte
    accesses are read from memory once. The kernel runs on the caller's current stream and is
    CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout, or ``eps``
            is not a finite float >= 0; raised before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _RMS_NORM_CHECKS.check(
        (out, x, weight), (eps,), lambda: _validate("rms_norm", {"x": x, "out": out}, weight, eps)
    )
    get_function("rms_norm")(out, x, weight, float(eps))


def fused_add_rms_norm(x: Any, residual: Any, weight: Any, eps: float) -> None:
    """Residual add then RMS norm, both in place (vLLM's ``fused_add_rms_norm``)::

        residual = (x + residual).to(x.dtype)   # written to `residual`
        x = rms_norm(residual, weight, eps)      # written to `x`

    The same result as the runtime's ``RMSNorm.forward(x, residual)``, which returns
    ``(normed, new_residual)``: here ``x`` receives ``normed`` and ``residual`` receives
    ``new_residual``.

    Args:
        x: ``[num_tokens, hidden]``, float16, bfloat16 or float32; read, then overwritten with
            the normalised sum.
        residual: ``[num_tokens, hidden]``, dtype of ``x``; read, then overwritten with the sum.
        weight: ``[hidden]``, dtype of ``x``.
        eps: a finite float >= 0.

    All tensors are C-contiguous CUDA tensors on one device; ``x`` and ``residual`` must not
    overlap. Runs on the caller's current stream; CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout, or ``eps``
            is invalid; raised before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _FUSED_ADD_RMS_NORM_CHECKS.check(
        (x, residual, weight), (eps,),
        lambda: _validate("fused_add_rms_norm", {"x": x, "residual": residual}, weight, eps),
    )
    get_function("fused_add_rms_norm")(x, residual, weight, float(eps))
