"""Mixture of experts: ``moe_grouped_gemm`` (every expert's matrix product in one launch, with an
optional gather of its rows and a weighted scatter of its results), ``moe_grouped_gemm_gated``
(the gate/up projection with the gated activation in its epilogue), ``moe_sort_by_expert`` (the
routed pairs sorted by expert on the device) and ``moe_sum_topk`` (each token's top-k rows
summed)."""

from __future__ import annotations

from typing import Any

from . import _checks as C
from ._lib import get_function

#: Dtypes of the grouped GEMM (tensor cores; float32 models use the runtime's torch path).
MOE_GROUPED_GEMM_DTYPES: tuple[str, ...] = ("float16", "bfloat16")
#: Gate activations of ``moe_grouped_gemm_gated``: SiLU, GELU (erf) and GELU (tanh approximation).
MOE_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "gelu_tanh")
#: Dtypes of the routed expert ids (``torch.topk`` gives int64).
MOE_ID_DTYPES: tuple[str, ...] = ("int32", "int64")

_CHECKS = C.CheckMemo()
_CHECKS_INDEXED = C.CheckMemo()
_CHECKS_GATED = C.CheckMemo()
_CHECKS_SORT = C.CheckMemo()
_CHECKS_SUM = C.CheckMemo()
_OP = "moe_grouped_gemm"
_INT32_MAX = 2**31 - 1


def _aligned(x: Any, nbytes: int) -> bool:
    """True when ``x``'s first element is ``nbytes``-aligned (assumed when it cannot be told)."""
    data_ptr = getattr(x, "data_ptr", None)
    return not callable(data_ptr) or int(data_ptr()) % nbytes == 0


def _validate_operands(op: str, x: Any, w: Any, expert_offsets: Any,
                       w_dims: tuple[str, str, str]) -> tuple[int, int, int]:
    """x [rows, K], w [E, N, K], expert_offsets [E + 1]; returns (E, N, K)."""
    C.check_shape(op, "x", x, ("num_rows", "in_features"), (None, None))
    C.check_dtype(op, "x", x, MOE_GROUPED_GEMM_DTYPES)
    in_features = C.shape_of(x)[1]
    if in_features <= 0 or in_features % 8:
        raise C.arg_error(op, "x", "of shape [num_rows, in_features] with in_features a "
                          "positive multiple of 8", str(list(C.shape_of(x))))
    C.check_shape(op, "w", w, w_dims, (None, None, in_features))
    C.check_same_dtype(op, "w", w, "x", x)
    num_experts, out_features, _ = C.shape_of(w)
    if num_experts <= 0:
        raise C.arg_error(op, "w", "a tensor with at least one expert",
                          str(list(C.shape_of(w))))
    C.check_shape(op, "expert_offsets", expert_offsets, ("num_experts + 1",),
                  (num_experts + 1,))
    C.check_dtype(op, "expert_offsets", expert_offsets, ("int64",))
    return num_experts, out_features, in_features


def _validate_devices(op: str, x: Any, others: dict[str, Any]) -> None:
    """Contiguity of every tensor, 16-byte alignment of x and w, one CUDA device."""
    for name, t in {"x": x, **others}.items():
        if t is not None:
            C.check_contiguous(op, name, t)
    for name, t in (("x", x), ("w", others["w"])):
        if not _aligned(t, 16):
            raise C.arg_error(op, name, "16-byte aligned", "a view at an unaligned offset "
                              "(call .clone() first)")
    C.check_cuda(op, "x", x)
    for name, t in others.items():
        if t is not None:
            C.check_same_device(op, name, t, "x", x)


def _check_index(op: str, name: str, t: Any, rows: int) -> None:
    C.check_shape(op, name, t, ("num_rows",), (rows,))
    C.check_dtype(op, name, t, ("int32",))


def _validate(out: Any, x: Any, w: Any, expert_offsets: Any) -> None:
    op = _OP
    _validate_operands(op, x, w, expert_offsets, ("num_experts", "out_features", "in_features"))
    num_rows = C.shape_of(x)[0]
    out_features = C.shape_of(w)[1]
    C.check_shape(op, "out", out, ("num_rows", "out_features"), (num_rows, out_features))
    C.check_same_dtype(op, "out", out, "x", x)
    _validate_devices(op, x, {"out": out, "w": w, "expert_offsets": expert_offsets})


def _validate_indexed(out: Any, x: Any, w: Any, expert_offsets: Any, row_index: Any,
                      out_index: Any, out_scale: Any) -> None:
    op = _OP
    _, out_features, _ = _validate_operands(op, x, w, expert_offsets,
                                            ("num_experts", "out_features", "in_features"))
    x_rows = C.shape_of(x)[0]
    rows = x_rows
    for name, t in (("row_index", row_index), ("out_index", out_index)):
        if t is not None:
            C.check_ndim(op, name, t, 1, "[num_rows]")
            rows = C.shape_of(t)[0]
            break
    for name, t in (("row_index", row_index), ("out_index", out_index)):
        if t is not None:
            _check_index(op, name, t, rows)
    if out_index is not None:
        C.check_shape(op, "out", out, ("out_rows", "out_features"), (None, out_features))
    else:
        C.check_shape(op, "out", out, ("num_rows", "out_features"), (rows, out_features))
    C.check_same_dtype(op, "out", out, "x", x)
    out_rows = C.shape_of(out)[0]
    if out_scale is not None:
        C.check_shape(op, "out_scale", out_scale, ("out_rows",), (out_rows,))
        C.check_dtype(op, "out_scale", out_scale, ("float32",))
    if max(rows, x_rows, out_rows) > _INT32_MAX:
        raise C.arg_error(op, "x", "of fewer than 2^31 rows (int32 indices)",
                          f"{x_rows} rows, {rows} product rows, {out_rows} out rows")
    _validate_devices(op, x, {"out": out, "w": w, "expert_offsets": expert_offsets,
                              "row_index": row_index, "out_index": out_index,
                              "out_scale": out_scale})


def moe_grouped_gemm(out: Any, x: Any, w: Any, expert_offsets: Any, row_index: Any = None,
                     out_index: Any = None, out_scale: Any = None) -> None:
    """Every expert's rows times its weight, in one launch (a grouped GEMM)::

        for e in range(num_experts):
            for r in range(expert_offsets[e], expert_offsets[e + 1]):
                src = row_index[r] if row_index is not None else r
                dst = out_index[r] if out_index is not None else r
                scale = out_scale[dst] if out_scale is not None else 1
                out[dst] = scale * (x[src] @ w[e].T)     # float32, rounded once

    Without the optional arguments this is the plain grouped GEMM of expert-sorted rows. With
    ``row_index`` the rows are gathered from ``x`` by the kernel itself (e.g. the layer's tokens,
    without a gathered copy); with ``out_index`` / ``out_scale`` each result row is scaled and
    scattered (e.g. to its (token, slot) row, times the routing weight).

    Args:
        out: ``[num_rows, out_features]`` (``[out_rows, out_features]`` with ``out_index``),
            dtype of ``x``; written for the rows of every segment only (rows at or past
            ``expert_offsets[-1]``, and rows no index points at, are left as they are).
        x: ``[x_rows, in_features]``, float16 or bfloat16; without ``row_index`` its rows are
            the product rows, sorted by expert; ``in_features`` a multiple of 8.
        w: ``[num_experts, out_features, in_features]``, dtype of ``x``: each expert's weight in
            ``nn.Linear`` layout (e.g. the fused gate/up projection ``[E, 2 * I, H]``, or the
            down projection ``[E, H, I]``).
        expert_offsets: ``[num_experts + 1]`` int64 on the device of ``x``: segment bounds over
            the product rows, ``0 = offsets[0] <= offsets[1] <= ... <= offsets[E] <= num_rows``
            (the exclusive cumulative sum of the rows per expert). Read by the kernel, so no
            host sync; out-of-range values are clamped to ``[0, num_rows]``.
        row_index: optional int32 ``[num_rows]``: the ``x`` row of each product row; an index
            outside ``[0, x_rows)`` reads a row of zeros.
        out_index: optional int32 ``[num_rows]``: the ``out`` row of each product row; a row
            whose index is outside ``[0, out_rows)`` is not written.
        out_scale: optional float32 ``[out_rows]``: multiplies each ``out`` row (in float32,
            before the rounding).

    ``num_rows`` is the length of ``row_index`` (or ``out_index``), else ``x_rows``. All tensors
    are C-contiguous CUDA tensors on one device; ``x`` and ``w`` start at 16-byte aligned
    addresses. Products are computed on tensor cores (mma.sync m16n8k16, a tile chosen per
    launch; ``CACHEFLOW_MOE_GEMM`` overrides it, see the package README) with float32
    accumulation and rounded once to the dtype. Runs on the caller's current stream; the grid
    depends only on the shapes, so a launch is CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape, alignment or memory layout;
            raised before the kernel library is loaded.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    if row_index is None and out_index is None and out_scale is None:
        _CHECKS.check((out, x, w, expert_offsets), (),
                      lambda: _validate(out, x, w, expert_offsets))
        get_function(_OP)(out, x, w, expert_offsets)
        return
    _CHECKS_INDEXED.check(
        (out, x, w, expert_offsets, row_index, out_index, out_scale), (),
        lambda: _validate_indexed(out, x, w, expert_offsets, row_index, out_index, out_scale))
    get_function("moe_grouped_gemm_indexed")(out, x, w, expert_offsets, row_index, out_index,
                                             out_scale)


def _validate_gated(out: Any, x: Any, w: Any, expert_offsets: Any, row_index: Any,
                    activation: Any) -> None:
    op = "moe_grouped_gemm_gated"
    if activation not in MOE_ACTIVATIONS:
        raise C.arg_error(op, "activation", "'silu', 'gelu' or 'gelu_tanh'", repr(activation))
    _, two_inter, _ = _validate_operands(op, x, w, expert_offsets,
                                         ("num_experts", "2 * intermediate", "in_features"))
    if two_inter % 2:
        raise C.arg_error(op, "w", "of shape [num_experts, 2 * intermediate, in_features] "
                          "(gate rows, then up rows: an even count)", str(list(C.shape_of(w))))
    x_rows = C.shape_of(x)[0]
    rows = x_rows
    if row_index is not None:
        C.check_ndim(op, "row_index", row_index, 1, "[num_rows]")
        rows = C.shape_of(row_index)[0]
        _check_index(op, "row_index", row_index, rows)
    C.check_shape(op, "out", out, ("num_rows", "intermediate"), (rows, two_inter // 2))
    C.check_same_dtype(op, "out", out, "x", x)
    if max(rows, x_rows) > _INT32_MAX:
        raise C.arg_error(op, "x", "of fewer than 2^31 rows (int32 indices)",
                          f"{x_rows} rows, {rows} product rows")
    _validate_devices(op, x, {"out": out, "w": w, "expert_offsets": expert_offsets,
                              "row_index": row_index})


def moe_grouped_gemm_gated(out: Any, x: Any, w: Any, expert_offsets: Any, row_index: Any = None,
                           activation: str = "silu") -> None:
    """The gate/up projection of every expert with the gated activation fused, in one launch::

        for e in range(num_experts):
            for r in range(expert_offsets[e], expert_offsets[e + 1]):
                src = row_index[r] if row_index is not None else r
                h = x[src] @ w[e].T                       # [2 * I], float32
                out[r] = act(h[:I]) * h[I:]               # rounded once

    No ``[num_rows, 2 * I]`` intermediate is written: each block multiplies matching gate and
    up columns and applies ``act`` to its float32 accumulators.

    Args:
        out: ``[num_rows, intermediate]``, dtype of ``x``; rows at or past
            ``expert_offsets[-1]`` are left as they are.
        x: ``[x_rows, in_features]``, float16 or bfloat16 (``in_features`` a multiple of 8).
        w: ``[num_experts, 2 * intermediate, in_features]``: each expert's gate rows, then its
            up rows (the layout of ``FusedMoE.w13_weight``).
        expert_offsets: ``[num_experts + 1]`` int64 segment bounds (see
            :func:`moe_grouped_gemm`).
        row_index: optional int32 ``[num_rows]``: the ``x`` row of each product row (the
            token of each sorted (token, slot) pair); outside ``[0, x_rows)``: a zero row.
        activation: ``"silu"`` (``g * sigmoid(g)``), ``"gelu"`` (``0.5 g (1 + erf(g /
            sqrt(2)))``) or ``"gelu_tanh"`` (the tanh approximation), like ``silu_and_mul`` /
            ``gelu_and_mul``.

    Tile choice, ``CACHEFLOW_MOE_GEMM`` (``wmma`` means the automatic choice here), streams and
    CUDA graphs as for :func:`moe_grouped_gemm`.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape, alignment, layout or value.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _CHECKS_GATED.check(
        (out, x, w, expert_offsets, row_index), (activation,),
        lambda: _validate_gated(out, x, w, expert_offsets, row_index, activation))
    get_function("moe_grouped_gemm_gated")(out, x, w, expert_offsets, row_index,
                                           str(activation))


def _validate_sort(expert_offsets: Any, sorted_pairs: Any, token_index: Any,
                   topk_ids: Any) -> None:
    op = "moe_sort_by_expert"
    C.check_shape(op, "topk_ids", topk_ids, ("num_tokens", "top_k"), (None, None))
    C.check_dtype(op, "topk_ids", topk_ids, MOE_ID_DTYPES)
    num_tokens, top_k = C.shape_of(topk_ids)
    if top_k <= 0:
        raise C.arg_error(op, "topk_ids", "of shape [num_tokens, top_k] with top_k >= 1",
                          str([num_tokens, top_k]))
    pairs = num_tokens * top_k
    if pairs > _INT32_MAX:
        raise C.arg_error(op, "topk_ids", "of fewer than 2^31 elements", str(pairs))
    C.check_ndim(op, "expert_offsets", expert_offsets, 1, "[num_experts + 1]")
    C.check_dtype(op, "expert_offsets", expert_offsets, ("int64",))
    if C.shape_of(expert_offsets)[0] < 2:
        raise C.arg_error(op, "expert_offsets", "of shape [num_experts + 1] with "
                          "num_experts >= 1", str(list(C.shape_of(expert_offsets))))
    for name, t in (("sorted_pairs", sorted_pairs), ("token_index", token_index)):
        C.check_shape(op, name, t, ("num_tokens * top_k",), (pairs,))
        C.check_dtype(op, name, t, ("int32",))
    for name, t in (("expert_offsets", expert_offsets), ("sorted_pairs", sorted_pairs),
                    ("token_index", token_index), ("topk_ids", topk_ids)):
        C.check_contiguous(op, name, t)
    C.check_cuda(op, "topk_ids", topk_ids)
    for name, t in (("expert_offsets", expert_offsets), ("sorted_pairs", sorted_pairs),
                    ("token_index", token_index)):
        C.check_same_device(op, name, t, "topk_ids", topk_ids)


def moe_sort_by_expert(expert_offsets: Any, sorted_pairs: Any, token_index: Any,
                       topk_ids: Any) -> None:
    """Sorts a MoE layer's routed (token, slot) pairs by expert on the device (no host sync)::

        flat = topk_ids.reshape(-1)                    # pair p = token * top_k + slot
        bucket = flat where 0 <= flat < E, else E      # out-of-range ids go last
        sorted_pairs[:] = argsort(bucket, stable=True)
        token_index[:] = sorted_pairs // top_k
        expert_offsets[:] = [0, cumsum(counts of buckets 0 .. E - 1)]

    The result is the segment layout the grouped GEMMs take: ``expert_offsets`` bounds each
    expert's rows, ``token_index`` is the ``row_index`` of the gate/up projection and
    ``sorted_pairs`` the ``out_index`` of the down projection. Stable: within an expert the
    pairs keep their order (the order of ``torch.argsort(..., stable=True)``). Pairs of ids
    outside ``[0, num_experts)`` (e.g. experts of another rank) come after
    ``expert_offsets[-1]`` and are in no segment.

    Args:
        expert_offsets: int64 ``[num_experts + 1]``, written.
        sorted_pairs: int32 ``[num_tokens * top_k]``, written.
        token_index: int32 ``[num_tokens * top_k]``, written.
        topk_ids: int32 or int64 ``[num_tokens, top_k]``: each token's experts.

    One launch of ``num_experts + 1`` blocks (each reads the ids twice, from L2), on the
    caller's stream; CUDA-graph capturable. All tensors C-contiguous on one CUDA device.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or memory layout.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _CHECKS_SORT.check(
        (expert_offsets, sorted_pairs, token_index, topk_ids), (),
        lambda: _validate_sort(expert_offsets, sorted_pairs, token_index, topk_ids))
    get_function("moe_sort_by_expert")(expert_offsets, sorted_pairs, token_index, topk_ids)


def _validate_sum(out: Any, x: Any, topk_ids: Any, num_experts: Any) -> None:
    op = "moe_sum_topk"
    C.check_shape(op, "x", x, ("num_tokens", "top_k", "hidden"), (None, None, None))
    C.check_dtype(op, "x", x, MOE_GROUPED_GEMM_DTYPES)
    num_tokens, top_k, hidden = C.shape_of(x)
    C.check_shape(op, "out", out, ("num_tokens", "hidden"), (num_tokens, hidden))
    C.check_same_dtype(op, "out", out, "x", x)
    C.check_shape(op, "topk_ids", topk_ids, ("num_tokens", "top_k"), (num_tokens, top_k))
    C.check_dtype(op, "topk_ids", topk_ids, MOE_ID_DTYPES)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise C.arg_error(op, "num_experts", "a positive int", repr(num_experts))
    for name, t in (("out", out), ("x", x), ("topk_ids", topk_ids)):
        C.check_contiguous(op, name, t)
    C.check_cuda(op, "x", x)
    C.check_same_device(op, "out", out, "x", x)
    C.check_same_device(op, "topk_ids", topk_ids, "x", x)


def moe_sum_topk(out: Any, x: Any, topk_ids: Any, num_experts: int) -> None:
    """Each token's rows summed over its top-k slots: the combine of a MoE layer::

        out[t] = sum(x[t, s] for s in range(top_k) if 0 <= topk_ids[t, s] < num_experts)

    in float32, slot by slot in order (deterministic), rounded once to the dtype. Slots of ids
    outside ``[0, num_experts)`` are skipped, so their rows of ``x`` may hold anything (they are
    the rows :func:`moe_sort_by_expert` leaves out of every segment).

    Args:
        out: ``[num_tokens, hidden]``, dtype of ``x``, written.
        x: ``[num_tokens, top_k, hidden]`` float16 or bfloat16 (e.g. the down projection's rows
            scattered per (token, slot) by :func:`moe_grouped_gemm` with ``out_index``).
        topk_ids: int32 or int64 ``[num_tokens, top_k]``.
        num_experts: the number of experts (ids at or above it are skipped).

    Runs on the caller's stream (16-byte accesses where ``hidden`` is a multiple of 8);
    CUDA-graph capturable.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape, value or memory layout.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or the launch failed.
    """
    _CHECKS_SUM.check((out, x, topk_ids), (num_experts,),
                      lambda: _validate_sum(out, x, topk_ids, num_experts))
    get_function("moe_sum_topk")(out, x, topk_ids, int(num_experts))
