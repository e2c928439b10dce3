"""Mixture of experts: ``moe_grouped_gemm``, every expert's matrix product in one launch."""

from __future__ import annotations

from typing import Any

from . import _checks as C
from ._lib import get_function

#: Dtypes of the grouped GEMM (tensor cores; float32 models use the runtime's torch path).
MOE_GROUPED_GEMM_DTYPES: tuple[str, ...] = ("float16", "bfloat16")

_CHECKS = C.CheckMemo()
_OP = "moe_grouped_gemm"


def _aligned(x: Any, nbytes: int) -> bool:
    """True when ``x``'s first element is ``nbytes``-aligned (assumed when it cannot be told)."""
    data_ptr = getattr(x, "data_ptr", None)
    return not callable(data_ptr) or int(data_ptr()) % nbytes == 0


def _validate(out: Any, x: Any, w: Any, expert_offsets: Any) -> None:
    op = _OP
    C.check_shape(op, "x", x, ("num_rows", "in_features"), (None, None))
    C.check_dtype(op, "x", x, MOE_GROUPED_GEMM_DTYPES)
    num_rows, in_features = C.shape_of(x)
    if in_features <= 0 or in_features % 8:
        raise C.arg_error(op, "x", "of shape [num_rows, in_features] with in_features a "
                          "positive multiple of 8", str(list(C.shape_of(x))))
    C.check_shape(op, "w", w, ("num_experts", "out_features", "in_features"),
                  (None, None, in_features))
    C.check_same_dtype(op, "w", w, "x", x)
    num_experts, out_features, _ = C.shape_of(w)
    if num_experts <= 0:
        raise C.arg_error(op, "w", "a tensor with at least one expert",
                          str(list(C.shape_of(w))))
    C.check_shape(op, "expert_offsets", expert_offsets, ("num_experts + 1",),
                  (num_experts + 1,))
    C.check_dtype(op, "expert_offsets", expert_offsets, ("int64",))
    C.check_shape(op, "out", out, ("num_rows", "out_features"), (num_rows, out_features))
    C.check_same_dtype(op, "out", out, "x", x)
    for name, t in (("out", out), ("x", x), ("w", w), ("expert_offsets", expert_offsets)):
        C.check_contiguous(op, name, t)
    for name, t in (("x", x), ("w", w)):
        if not _aligned(t, 16):
            raise C.arg_error(op, name, "16-byte aligned", "a view at an unaligned offset "
                              "(call .clone() first)")
    C.check_cuda(op, "x", x)
    for name, t in (("w", w), ("out", out), ("expert_offsets", expert_offsets)):
        C.check_same_device(op, name, t, "x", x)


def moe_grouped_gemm(out: Any, x: Any, w: Any, expert_offsets: Any) -> None:
    """Every expert's rows times its weight, in one launch (a grouped GEMM)::

        for e in range(num_experts):
            rows = slice(expert_offsets[e], expert_offsets[e + 1])
            out[rows] = x[rows] @ w[e].T

    Args:
        out: ``[num_rows, out_features]``, dtype of ``x``; written for the rows of every
            segment (rows at or past ``expert_offsets[-1]`` are left as they are).
        x: ``[num_rows, in_features]``, float16 or bfloat16, rows sorted by expert (a MoE
            layer's tokens, each repeated once per expert it was routed to); ``in_features``
            a multiple of 8.
        w: ``[num_experts, out_features, in_features]``, dtype of ``x``: each expert's weight in
            ``nn.Linear`` layout (e.g. the fused gate/up projection ``[E, 2 * I, H]``, or the
            down projection ``[E, H, I]``).
        expert_offsets: ``[num_experts + 1]`` int64 on the device of ``x``: segment bounds,
            ``0 = offsets[0] <= offsets[1] <= ... <= offsets[E] <= num_rows`` (the exclusive
            cumulative sum of the rows per expert). Read by the kernel, so no host sync;
            out-of-range values are clamped to ``[0, num_rows]``.

    All tensors are C-contiguous CUDA tensors on one device; ``x`` and ``w`` start at 16-byte
    aligned addresses. Products are computed on tensor cores (mma.sync m16n8k16, a tile
    chosen per launch; ``CACHEFLOW_MOE_GEMM`` overrides it, see the package README) with float32
    accumulation and rounded once to the dtype. Runs on the caller's current stream; the grid
    depends only on the shapes, so a launch is CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape, alignment or memory layout;
            raised before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _CHECKS.check((out, x, w, expert_offsets), (),
                  lambda: _validate(out, x, w, expert_offsets))
    get_function(_OP)(out, x, w, expert_offsets)
