"""``skinny_gemm``: ``out = x @ weight.T (+ bias)`` for one or two rows of ``x`` (decode GEMMs at
batch 1 or 2), reading the weight with TMA bulk copies on compute capability 9.0 and newer;
optionally with the gated SiLU of an MLP applied to ``x`` on the way in."""

from __future__ import annotations

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
    if C.is_contiguous(x) or rows <= 1:
        return cols
    stride = getattr(x, "stride", None)
    if not callable(stride):
        return None
    s = tuple(stride())
    return s[0] if cols <= 1 or s[1] == 1 else None


def _validate(out: Any, x: Any, weight: Any, bias: Any, activation: Any) -> None:
    op = "skinny_gemm"
    if activation is not None and activation not in SKINNY_GEMM_ACTIVATIONS:
        raise C.arg_error(op, "activation", "None or 'silu'", repr(activation))
    gated = activation is not None
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
    C.check_contiguous(op, "weight", weight)
    for name, t in (("x", x), ("out", out)):
        stride = _row_stride(t)
        if stride is None or (name == "x" and stride % 8):
            need = "rows contiguous, 16-byte aligned" if name == "x" else "rows contiguous"
            raise C.arg_error(op, name, need, "another layout")
    C.check_cuda(op, "x", x)
    for name, t in (("weight", weight), ("out", out), ("bias", bias)):
        if t is not None:
            C.check_same_device(op, name, t, "x", x)


def skinny_gemm(out: Any, x: Any, weight: Any, bias: Any = None,
                activation: str | None = None) -> None:
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

    CUDA tensors on one device of compute capability 9.0 or newer. Runs on the caller's current
    stream; CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or layout (raised before the
            kernel library is loaded), or a pointer is not 16-byte aligned.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing, the device is older than compute
            capability 9.0, or the launch failed.
    """
    tensors = (out, x, weight) if bias is None else (out, x, weight, bias)
    _CHECKS.check(tensors, (bias is None, activation),
                  lambda: _validate(out, x, weight, bias, activation))
    get_function("skinny_gemm")(out, x, weight, bias, activation or "")
