"""Activations: gated (``silu_and_mul``, ``gelu_and_mul``) and element-wise (``gelu_new``,
``gelu_fast``), computed in float32."""

from __future__ import annotations

from typing import Any

from . import _checks as C
from ._lib import get_function

# One memo per op: the checks' messages name the op.
_CHECKS: dict[str, C.CheckMemo] = {
    op: C.CheckMemo() for op in ("silu_and_mul", "gelu_and_mul", "gelu_new", "gelu_fast")
}


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _validate_and_mul(op: str, out: Any, x: Any) -> None:
    C._require_tensor(op, "x", x)
    x_shape = C.shape_of(x)
    if not x_shape:
        raise C.arg_error(op, "x", "a tensor [..., 2 * d] of at least 1 dimension",
                          "a 0-D tensor")
    C.check_dtype(op, "x", x, C.FLOAT_KV_DTYPES)
    if x_shape[-1] % 2:
        raise C.arg_error(op, "x", "of shape [..., 2 * d] (an even last dimension)",
                          _shape_str(x_shape))
    C._require_tensor(op, "out", out)
    want = x_shape[:-1] + (x_shape[-1] // 2,)
    if C.shape_of(out) != want:
        raise C.arg_error(
            op, "out", f"of shape {_shape_str(want)} (the shape of 'x' with the last dimension "
            "halved)", _shape_str(C.shape_of(out)),
        )
    C.check_same_dtype(op, "out", out, "x", x)
    C.check_contiguous(op, "out", out)
    C.check_contiguous(op, "x", x)
    C.check_cuda(op, "x", x)
    C.check_same_device(op, "out", out, "x", x)


def _validate_flat(op: str, out: Any, x: Any) -> None:
    C.check_dtype(op, "x", x, C.FLOAT_KV_DTYPES)
    C._require_tensor(op, "out", out)
    if C.shape_of(out) != C.shape_of(x):
        raise C.arg_error(op, "out", f"of shape {_shape_str(C.shape_of(x))} like 'x'",
                          _shape_str(C.shape_of(out)))
    C.check_same_dtype(op, "out", out, "x", x)
    C.check_contiguous(op, "out", out)
    C.check_contiguous(op, "x", x)
    C.check_cuda(op, "x", x)
    C.check_same_device(op, "out", out, "x", x)


def silu_and_mul(out: Any, x: Any) -> None:
    """Gated SiLU: ``out = silu(x[..., :d]) * x[..., d:]``, ``silu(g) = g / (1 + exp(-g))``.

    Args:
        out: ``[..., d]``, dtype of ``x``; written.
        x: ``[..., 2 * d]``, float16, bfloat16 or float32: ``gate = x[..., :d]``,
            ``up = x[..., d:]`` (the fused gate/up projection of an MLP).

    Both tensors are C-contiguous CUDA tensors on one device. The activation is computed in
    float32 and rounded to the dtype before the multiply, like the runtime's torch layer
    (``F.silu(gate) * up``: two eager ops). Runs on the caller's current stream; CUDA-graph
    capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout; raised
            before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    op = "silu_and_mul"
    _CHECKS[op].check((out, x), (), lambda: _validate_and_mul(op, out, x))
    get_function(op)(out, x)


def gelu_and_mul(out: Any, x: Any, approximate: str = "none") -> None:
    """Gated GELU: ``out = F.gelu(x[..., :d], approximate=approximate) * x[..., d:]``.

    ``approximate="none"``: ``gelu(g) = 0.5 * g * (1 + erf(g / sqrt(2)))``;
    ``approximate="tanh"``:
    ``gelu(g) = 0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g**3)))``.

    Args:
        out: ``[..., d]``, dtype of ``x``; written.
        x: ``[..., 2 * d]``, float16, bfloat16 or float32: ``gate = x[..., :d]``,
            ``up = x[..., d:]``.
        approximate: ``"none"`` (exact, erf) or ``"tanh"``.

    Both tensors are C-contiguous CUDA tensors on one device. The activation is computed in
    float32 and rounded to the dtype before the multiply, like the runtime's torch layer. Runs
    on the caller's current stream; CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout; raised
            before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    op = "gelu_and_mul"
    if approximate not in ("none", "tanh"):
        raise C.arg_error(op, "approximate", "'none' or 'tanh'", repr(approximate))
    _CHECKS[op].check((out, x), (), lambda: _validate_and_mul(op, out, x))
    get_function(op)(out, x, str(approximate))


def gelu_new(out: Any, x: Any) -> None:
    """GPT-2's ``gelu_new``: ``out = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``.

    Args:
        out: same shape and dtype as ``x``; written. May be ``x`` itself (in place).
        x: any shape, float16, bfloat16 or float32.

    Both tensors are C-contiguous CUDA tensors on one device. Computed in float32 and rounded
    once (the runtime's torch version rounds after every step in float16/bfloat16, so results
    there differ by a few units in the last place). Runs on the caller's current stream;
    CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout; raised
            before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _CHECKS["gelu_new"].check((out, x), (), lambda: _validate_flat("gelu_new", out, x))
    get_function("gelu_new")(out, x)


def gelu_fast(out: Any, x: Any) -> None:
    """HF's ``gelu_fast``:
    ``out = 0.5 * x * (1 + tanh(x * 0.7978845608 * (1 + 0.044715 * x * x)))``.

    Args:
        out: same shape and dtype as ``x``; written. May be ``x`` itself (in place).
        x: any shape, float16, bfloat16 or float32.

    Both tensors are C-contiguous CUDA tensors on one device. Computed in float32 and rounded
    once. Runs on the caller's current stream; CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout; raised
            before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _CHECKS["gelu_fast"].check((out, x), (), lambda: _validate_flat("gelu_fast", out, x))
    get_function("gelu_fast")(out, x)

