"""``skinny_gemm``: ``out = x @ weight.T (+ bias)`` for one or two rows of ``x`` (decode GEMMs at
batch 1 or 2), reading the weight with TMA bulk copies on compute capability 9.0 and newer;
optionally with the gated SiLU of an MLP or an RMS norm applied to ``x`` on the way in, and a
residual added on the way out."""

from __future__ import annotations

import math
from typing import Any

from . import _checks as C
from ._lib import get_function

SKINNY_GEMM_MAX_ROWS = 2
SKINNY_GEMM_MAX_K = 16384
#: Activations ``skinny_gemm`` applies to ``x = [gate | up]`` (None: x as it is).
SKINNY_GEMM_ACTIVATIONS = ("silu",)
_DTYPES = ("float16", "bfloat16")
_CHECKS = C.CheckMemo()


def _row_stride(x: Any) -> int | None:
    """Elements between the rows of a 2-D tensor whose rows are contiguous; None otherwise."""
    rows, cols = C.shape_of(x)
    if C.is_contiguous(x):
        return cols
    stride = getattr(x, "stride", None)
    if not callable(stride):
        return None
    s = tuple(stride())
    if cols > 1 and s[1] != 1:  # elements of a row apart: even a single row is not contiguous
        return None
    return s[0] if rows > 1 else cols


def _validate(out: Any, x: Any, weight: Any, bias: Any, activation: Any, norm_weight: Any,
              residual: Any) -> None:
    op = "skinny_gemm"
    if activation is not None and activation not in SKINNY_GEMM_ACTIVATIONS:
        raise C.arg_error(op, "activation", "None or 'silu'", repr(activation))
    gated = activation is not None
    if gated and norm_weight is not None:
        raise C.arg_error(op, "norm_weight", "None with activation 'silu'", "a tensor")
    C.check_shape(op, "x", x, ("m", "2 k" if gated else "k"), (None, None))
    C.check_dtype(op, "x", x, _DTYPES)
    m, width = C.shape_of(x)
    if gated and width % 2:
        raise C.arg_error(op, "x", "[gate | up] of an even width", f"width {width}")
    k = width // 2 if gated else width
    if not 1 <= m <= SKINNY_GEMM_MAX_ROWS:
        raise C.arg_error(op, "x", f"1 to {SKINNY_GEMM_MAX_ROWS} rows", f"{m} rows")
    if k < 64 or k % 64 or k > SKINNY_GEMM_MAX_K:
        raise C.arg_error(op, "x", f"a row length k that is a multiple of 64 and at most "
                          f"{SKINNY_GEMM_MAX_K}", f"k = {k}")
    C.check_shape(op, "weight", weight, ("n", "k"), (None, k))
    n = C.shape_of(weight)[0]
    C.check_shape(op, "out", out, ("m", "n"), (m, n))
    for name, t in (("weight", weight), ("out", out)):
        C.check_same_dtype(op, name, t, "x", x)
    if bias is not None:
        C.check_shape(op, "bias", bias, ("n",), (n,))
        C.check_same_dtype(op, "bias", bias, "x", x)
        C.check_contiguous(op, "bias", bias)
    if norm_weight is not None:
        C.check_shape(op, "norm_weight", norm_weight, ("k",), (k,))
        C.check_same_dtype(op, "norm_weight", norm_weight, "x", x)
        C.check_contiguous(op, "norm_weight", norm_weight)
    if residual is not None:
        C.check_shape(op, "residual", residual, ("m", "n"), (m, n))
        C.check_same_dtype(op, "residual", residual, "x", x)
    C.check_contiguous(op, "weight", weight)
    for name, t in (("x", x), ("out", out), ("residual", residual)):
        if t is None:
            continue
        stride = _row_stride(t)
        if stride is None or (name == "x" and stride % 8):
            need = "rows contiguous, 16-byte aligned" if name == "x" else "rows contiguous"
            raise C.arg_error(op, name, need, "another layout")
    C.check_cuda(op, "x", x)
    for name, t in (("weight", weight), ("out", out), ("bias", bias),
                    ("norm_weight", norm_weight), ("residual", residual)):
        if t is not None:
            C.check_same_device(op, name, t, "x", x)


def skinny_gemm(out: Any, x: Any, weight: Any, bias: Any = None,
                activation: str | None = None, norm_weight: Any = None, eps: float = 1e-6,
                residual: Any = None) -> None:
    """``out = x @ weight.T + bias`` for ``x`` of one or two rows, like ``F.linear``.

    Made for the GEMMs of a decode step at batch 1 or 2, which are weight reads: the kernel
    streams ``weight`` through shared memory with TMA bulk copies and, launched with
    programmatic dependent launch, starts reading it before the kernel that writes ``x`` has
    finished. Products are summed in float32 and rounded once to the dtype.

    Args:
        out: ``[m, n]``, dtype of ``x``, rows contiguous; written.
        x: ``[m, k]``, float16 or bfloat16, 1 <= m <= 2, k a multiple of 64 and at most 16384,
            rows contiguous and 16-byte aligned.
        weight: ``[n, k]``, dtype of ``x``, C-contiguous, 16-byte aligned.
        bias: None or ``[n]``, dtype of ``x``, contiguous.
        activation: None, or ``"silu"``: then ``x`` is ``[m, 2 k]`` = ``[gate | up]`` and the
            product is with ``silu(gate) * up``, rounded as ``silu_and_mul`` rounds it (the
            activation to the dtype, then the product), so the result equals
            ``skinny_gemm(out, silu_and_mul(x), weight, bias)`` without the extra kernel.
        norm_weight: None, or ``[k]``, dtype of ``x``, contiguous, 16-byte aligned: the product
            is with ``rms_norm(x, norm_weight, eps)`` (rounded as :func:`rms_norm` rounds it), a
            layer's qkv or gate_up projection without the norm kernel before it. Each CTA sums
            the squares itself, in another order than :func:`rms_norm`, so a normalized element
            can differ from that op's by one rounding step. Not with ``activation``.
        eps: the norm's epsilon (a finite value above 0), used with ``norm_weight``.
        residual: None, or ``[m, n]``, dtype of ``x``, rows contiguous, and may be ``out``
            itself: ``out = residual + (x @ weight.T + bias)``, the product rounded to the dtype
            first and the sum rounded again, as :func:`fused_add_rms_norm` adds (a layer's o or
            down projection with its residual add).

    CUDA tensors on one device of compute capability 9.0 or newer. Runs on the caller's current
    stream; CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or layout (raised before the
            kernel library is loaded), or a pointer is not 16-byte aligned.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing, the device is older than compute
            capability 9.0, or the launch failed.
    """
    if norm_weight is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps)
                                        and eps > 0):
        raise C.arg_error("skinny_gemm", "eps", "a finite number above 0", repr(eps))
    tensors = tuple(t for t in (out, x, weight, bias, norm_weight, residual) if t is not None)
    _CHECKS.check(tensors, (bias is None, activation, norm_weight is None, residual is None),
                  lambda: _validate(out, x, weight, bias, activation, norm_weight, residual))
    get_function("skinny_gemm")(out, x, weight, bias, activation or "", norm_weight,
                                float(eps), residual)
