"""Mixture-of-experts layer on the grouped expert kernel against a per-expert torch loop,
measured in one process on one card.

    python packages/cacheflow-kernels/benchmarks/bench_moe.py --out bench_moe.json

For each shape (tokens T, experts E, top-k, hidden H, expert intermediate I) the same routing
(random router logits, softmax top-k, renormalised) and the same bfloat16 weights feed:

- ``loop``: the per-expert torch loop of HF transformers' MoE blocks: for every expert,
  ``torch.where`` over the routing, gather its tokens, ``linear`` gate/up, SiLU-and-mul,
  ``linear`` down, scale, ``index_add_``;
- ``grouped`` (the previous layer): sort the (token, slot) pairs by expert with torch
  (argsort, scatter_add, cumsum), gather the tokens (``index_select``), one
  ``moe_grouped_gemm`` launch for every expert's gate/up, ``silu_and_mul``, one launch for
  every expert's down projection, float32 scale + ``index_add_`` (no host synchronisation),
  once with the default mma.sync kernel (``mma``: CACHEFLOW_MOE_GEMM unset) and once with the
  original WMMA kernel (``wmma``: CACHEFLOW_MOE_GEMM=wmma; the library reads it at every call);
- ``fused`` (the runtime's layer now, cacheflow_runtime.layers.fused_moe with every piece of
  CACHEFLOW_MOE_FUSE): ``moe_sort_by_expert``, ``moe_grouped_gemm_gated`` gathering the tokens
  through ``row_index`` with SiLU-and-mul in its epilogue, ``moe_grouped_gemm`` with
  ``out_index``/``out_scale`` writing each weighted row to its (token, slot) row, and
  ``moe_sum_topk``; and (unless ``--no-ablate``) the same with one piece replaced by the
  previous step (``-sort``, ``-gather``, ``-act``, ``-combine``).

The layers are timed end to end from eager Python (CUDA events around ``--iters`` calls, median
of ``--repeats``) and checked against the loop (max abs difference relative to the output's
max). The GEMM columns time the two grouped launches alone (each kernel, plus any tiles forced
with ``--tiles``, e.g. ``--tiles 128x256,128x128,64x128,32x128``) against cuBLAS ``torch.mm``
per expert on the same sorted rows (segment bounds known on the host), with TFLOP/s of each,
and check each kernel's GEMM output against cuBLAS's; ``fused`` there times the fused
variants' two GEMMs (gated with the gather, indexed with the weighted scatter). Prints two
tables (layers, GEMMs) and writes JSON to --out. Without torch or CUDA it prints why and exits
with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from bench_timing import time_eager_us

# (name, tokens, experts, top_k, hidden, intermediate)
SHAPES = [
    ("small 8 experts", 4096, 8, 2, 1024, 2048),
    ("mid 8 experts", 4096, 8, 2, 2048, 5632),
    ("mixtral-8x7b", 4096, 8, 2, 4096, 14336),
    ("mixtral-8x7b decode", 64, 8, 2, 4096, 14336),
    ("qwen2-moe-like 60 experts", 4096, 60, 4, 2048, 1408),
]

#: Pieces of the fused layer (cacheflow_runtime.layers.fused_moe.FUSE_PIECES).
PIECES = ("sort", "gather", "act", "combine")


ENV = "CACHEFLOW_MOE_GEMM"


@dataclass
class Result:
    shape: str
    tokens: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    loop_ms: float | None = None
    grouped_ms: float | None = None  # default (mma.sync) kernel
    speedup: float | None = None     # loop / grouped
    rel_diff: float | None = None
    grouped_wmma_ms: float | None = None  # original WMMA kernel
    speedup_wmma: float | None = None
    rel_diff_wmma: float | None = None
    fused_ms: float | None = None        # every piece of the fused layer
    speedup_fused: float | None = None   # loop / fused
    fused_vs_grouped: float | None = None  # grouped (mma) / fused
    rel_diff_fused: float | None = None
    # the fused layer with one piece left out ("-sort", ...): ms and max relative difference
    ablation_ms: dict[str, float] = field(default_factory=dict)
    ablation_rel_diff: dict[str, float] = field(default_factory=dict)
    gemm_flop: float | None = None
    gemm_cublas_ms: float | None = None
    cublas_tflops: float | None = None
    # GEMMs alone per kernel ("mma": default choice, "wmma", forced tiles): ms, TFLOP/s, and
    # max |kernel - cuBLAS| / max |cuBLAS| over both GEMM outputs.
    gemm_ms: dict[str, float] = field(default_factory=dict)
    gemm_tflops: dict[str, float] = field(default_factory=dict)
    gemm_rel_diff: dict[str, float] = field(default_factory=dict)
    gemm_speedup: float | None = None  # cuBLAS per expert / default kernel
    error: str | None = None


class _Env:
    """Sets CACHEFLOW_MOE_GEMM for a block (None: unset), restoring it afterwards."""

    def __init__(self, value: str | None) -> None:
        self.value = value
        self.old: str | None = None

    def __enter__(self) -> None:
        self.old = os.environ.get(ENV)
        if self.value is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self.value

    def __exit__(self, *exc: Any) -> None:
        if self.old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self.old


def _time_ms(torch: Any, fn: Any, iters: int, repeats: int) -> float:
    """Median ms per call of ``fn``: ``repeats`` timings of ``iters`` back-to-back calls."""
    return time_eager_us(torch, lambda: [fn() for _ in range(iters)], repeats,
                         warmup=1) / iters / 1000.0


def per_expert_loop(torch: Any, x: Any, w13: Any, w2: Any, weights: Any, ids: Any) -> Any:
    """HF's loop: one pass per expert, synchronising on torch.where."""
    F = torch.nn.functional
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token, slot = torch.where(ids == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


def grouped(torch: Any, ck: Any, x: Any, w13: Any, w2: Any, weights: Any, ids: Any) -> Any:
    """The runtime's grouped scheme on the kernels (as cacheflow_runtime.layers.fused_moe)."""
    num_experts, top_k = w13.shape[0], ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    token_of_row = order // top_k
    rows = x.index_select(0, token_of_row)
    h = torch.empty(rows.shape[0], w13.shape[1], dtype=x.dtype, device=x.device)
    ck.moe_grouped_gemm(h, rows, w13, offsets)
    a = torch.empty(rows.shape[0], w13.shape[1] // 2, dtype=x.dtype, device=x.device)
    ck.silu_and_mul(a, h)
    y = torch.empty(rows.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    ck.moe_grouped_gemm(y, a, w2, offsets)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, y.float() * weights.reshape(-1)[order].unsqueeze(1))
    return out.to(x.dtype)


def fused(torch: Any, ck: Any, x: Any, w13: Any, w2: Any, weights: Any, ids: Any,
          pieces: frozenset[str] = frozenset(PIECES)) -> Any:
    """The runtime's fused layer (as cacheflow_runtime.layers.fused_moe._fused_cuda, SiLU),
    each piece not in ``pieces`` replaced by the previous step."""
    num_tokens, top_k = ids.shape
    num_experts, hidden, inter = w2.shape
    rows, dev, dt = num_tokens * top_k, x.device, x.dtype
    if "sort" in pieces:
        offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
        pairs = torch.empty(rows, dtype=torch.int32, device=dev)
        tokens = torch.empty(rows, dtype=torch.int32, device=dev)
        ck.moe_sort_by_expert(offsets, pairs, tokens, ids)
    else:
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
        torch.cumsum(counts, 0, out=offsets[1:])
        pairs, tokens = order.to(torch.int32), (order // top_k).to(torch.int32)
    gather = "gather" in pieces
    a = x if gather else x.index_select(0, tokens)
    row_index = tokens if gather else None
    if "act" in pieces:
        h = torch.empty(rows, inter, dtype=dt, device=dev)
        ck.moe_grouped_gemm_gated(h, a, w13, offsets, row_index=row_index)
    else:
        h13 = torch.empty(rows, 2 * inter, dtype=dt, device=dev)
        ck.moe_grouped_gemm(h13, a, w13, offsets, row_index=row_index)
        h = torch.empty(rows, inter, dtype=dt, device=dev)
        ck.silu_and_mul(h, h13)
    if "combine" in pieces:
        w = weights.reshape(-1)
        per_slot = torch.empty(num_tokens, top_k, hidden, dtype=dt, device=dev)
        ck.moe_grouped_gemm(per_slot.view(rows, hidden), h, w2, offsets, out_index=pairs,
                            out_scale=w)
        out = torch.empty(num_tokens, hidden, dtype=dt, device=dev)
        ck.moe_sum_topk(out, per_slot, ids, num_experts)
        return out
    y = torch.empty(rows, hidden, dtype=dt, device=dev)
    ck.moe_grouped_gemm(y, h, w2, offsets)
    order = pairs.long()
    out32 = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=dev)
    out32.index_add_(0, order // top_k, y.float() * weights.reshape(-1)[order].unsqueeze(1))
    return out32.to(dt)


def _rel(torch: Any, a: Any, ref: Any) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def run_shape(torch: Any, ck: Any, spec: tuple[str, int, int, int, int, int], iters: int,
              repeats: int, tiles: list[str], ablate: bool = True) -> Result:
    name, tokens, experts, top_k, hidden, inter = spec
    res = Result(name, tokens, experts, top_k, hidden, inter)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").to(dt)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device="cuda")
           / hidden ** 0.5).to(dt)
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device="cuda") / inter ** 0.5).to(dt)
    logits = torch.randn(tokens, experts, generator=gen, device="cuda")
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).contiguous()

    ref = per_expert_loop(torch, x, w13, w2, weights, ids)
    res.loop_ms = _time_ms(torch, lambda: per_expert_loop(torch, x, w13, w2, weights, ids),
                           iters, repeats)
    with _Env(None):
        res.rel_diff = _rel(torch, grouped(torch, ck, x, w13, w2, weights, ids), ref)
        res.grouped_ms = _time_ms(torch, lambda: grouped(torch, ck, x, w13, w2, weights, ids),
                                  iters, repeats)
    with _Env("wmma"):
        res.rel_diff_wmma = _rel(torch, grouped(torch, ck, x, w13, w2, weights, ids), ref)
        res.grouped_wmma_ms = _time_ms(
            torch, lambda: grouped(torch, ck, x, w13, w2, weights, ids), iters, repeats)
    res.speedup = res.loop_ms / res.grouped_ms
    res.speedup_wmma = res.loop_ms / res.grouped_wmma_ms
    with _Env(None):
        res.rel_diff_fused = _rel(torch, fused(torch, ck, x, w13, w2, weights, ids), ref)
        res.fused_ms = _time_ms(torch, lambda: fused(torch, ck, x, w13, w2, weights, ids),
                                iters, repeats)
        res.speedup_fused = res.loop_ms / res.fused_ms
        res.fused_vs_grouped = res.grouped_ms / res.fused_ms
        for piece in PIECES if ablate else ():
            rest = frozenset(PIECES) - {piece}
            res.ablation_rel_diff["-" + piece] = _rel(
                torch, fused(torch, ck, x, w13, w2, weights, ids, rest), ref)
            res.ablation_ms["-" + piece] = _time_ms(
                torch, lambda rest=rest: fused(torch, ck, x, w13, w2, weights, ids, rest),
                iters, repeats)

    # The GEMMs alone, on the same expert-sorted rows.
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)
    offsets = torch.zeros(experts + 1, dtype=torch.int64, device="cuda")
    torch.cumsum(counts, 0, out=offsets[1:])
    bounds = offsets.tolist()
    rows = x.index_select(0, order // top_k)
    h = torch.empty(rows.shape[0], 2 * inter, dtype=dt, device="cuda")
    a = torch.randn(rows.shape[0], inter, generator=gen, device="cuda").to(dt)
    y = torch.empty(rows.shape[0], hidden, dtype=dt, device="cuda")

    def cublas() -> None:
        for e in range(experts):
            b, t = bounds[e], bounds[e + 1]
            if t > b:
                torch.mm(rows[b:t], w13[e].t(), out=h[b:t])
                torch.mm(a[b:t], w2[e].t(), out=y[b:t])

    def kernel() -> None:
        ck.moe_grouped_gemm(h, rows, w13, offsets)
        ck.moe_grouped_gemm(y, a, w2, offsets)

    flops = 2.0 * rows.shape[0] * (2 * inter * hidden + hidden * inter)
    res.gemm_flop = flops
    cublas()
    h_ref, y_ref = h.clone(), y.clone()
    res.gemm_cublas_ms = _time_ms(torch, cublas, iters, repeats)
    res.cublas_tflops = flops / (res.gemm_cublas_ms * 1e-3) / 1e12
    for label, env in [("mma", None), ("wmma", "wmma")] + [(t, t) for t in tiles]:
        with _Env(env):
            h.fill_(float("nan"))
            y.fill_(float("nan"))
            kernel()
            res.gemm_rel_diff[label] = max(_rel(torch, h, h_ref), _rel(torch, y, y_ref))
            ms = _time_ms(torch, kernel, iters, repeats)
        res.gemm_ms[label] = ms
        res.gemm_tflops[label] = flops / (ms * 1e-3) / 1e12
    # The fused variants' GEMMs: the gated one gathering the tokens, the indexed one scattering
    # weighted rows per (token, slot); checked against cuBLAS's products of the same rows.
    pairs = order.to(torch.int32)
    tokens_of_rows = (order // top_k).to(torch.int32)
    h_fused = torch.empty(rows.shape[0], inter, dtype=dt, device="cuda")
    y_fused = torch.empty(rows.shape[0], hidden, dtype=dt, device="cuda")
    w_flat = weights.reshape(-1)

    def fused_kernels() -> None:
        ck.moe_grouped_gemm_gated(h_fused, x, w13, offsets, row_index=tokens_of_rows)
        ck.moe_grouped_gemm(y_fused, a, w2, offsets, out_index=pairs, out_scale=w_flat)

    with _Env(None):
        fused_kernels()
        gate, up = h_ref.float().chunk(2, dim=-1)
        act_ref = torch.nn.functional.silu(gate) * up
        y_want = torch.empty_like(y_ref, dtype=torch.float32)
        y_want[order] = y_ref.float() * w_flat[order].unsqueeze(1)
        res.gemm_rel_diff["fused"] = max(_rel(torch, h_fused, act_ref),
                                         _rel(torch, y_fused, y_want))
        ms = _time_ms(torch, fused_kernels, iters, repeats)
    res.gemm_ms["fused"] = ms
    res.gemm_tflops["fused"] = flops / (ms * 1e-3) / 1e12
    res.gemm_speedup = res.gemm_cublas_ms / res.gemm_ms["mma"]
    return res


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_moe.json")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="", help="comma-separated shape indices (all)")
    parser.add_argument("--tiles", default="",
                        help="comma-separated CACHEFLOW_MOE_GEMM tiles to time as GEMMs too "
                        "(128x256, 128x256s3, 128x128, 64x128, 32x128)")
    parser.add_argument("--no-ablate", action="store_true",
                        help="skip timing the fused layer with each piece left out")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_moe: torch is not installed; nothing measured")
        return 1
    if not torch.cuda.is_available():
        print("bench_moe: no CUDA device; nothing measured")
        return 1
    import cacheflow_kernels as ck

    picked = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    tiles = [t for t in args.tiles.split(",") if t]
    results = []
    for spec in picked:
        try:
            results.append(run_shape(torch, ck, spec, args.iters, args.repeats, tiles,
                                     not args.no_ablate))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next shape
            traceback.print_exc()
            results.append(Result(*spec, error=f"{type(exc).__name__}: {exc}"))
        torch.cuda.empty_cache()

    card = torch.cuda.get_device_name()
    ablations = ["-" + p for p in PIECES] if not args.no_ablate else []
    print(f"MoE layer, bfloat16, {card}, torch {torch.__version__}: the per-expert loop vs the "
          "previous grouped layer (mma kernel; wmma = CACHEFLOW_MOE_GEMM=wmma) vs the fused layer "
          "(every piece; -piece: that piece replaced by the previous step)")
    header = (f"{'shape':<26} {'T':>5} {'E':>3} {'k':>2} {'H':>5} {'I':>6} {'loop ms':>8} "
              f"{'old ms':>8} {'x loop':>6} {'fused ms':>8} {'x loop':>6} {'x old':>5} "
              f"{'rel diff':>8} {'wmma ms':>8} "
              + " ".join(f"{a + ' ms':>12}" for a in ablations))
    print(header)
    print("-" * len(header))
    for r in results:
        if r.error:
            print(f"{r.shape:<26} error: {r.error}")
            continue
        abl = " ".join(f"{_fmt(r.ablation_ms.get(a)):>12}" for a in ablations)
        print(f"{r.shape:<26} {r.tokens:>5} {r.experts:>3} {r.top_k:>2} {r.hidden:>5} "
              f"{r.intermediate:>6} {_fmt(r.loop_ms):>8} {_fmt(r.grouped_ms):>8} "
              f"{_fmt(r.speedup, '.2f'):>6} {_fmt(r.fused_ms):>8} "
              f"{_fmt(r.speedup_fused, '.2f'):>6} {_fmt(r.fused_vs_grouped, '.2f'):>5} "
              f"{_fmt(r.rel_diff_fused, '.1e'):>8} {_fmt(r.grouped_wmma_ms):>8} {abl}")
    labels = ["mma", "fused", "wmma"] + tiles
    print()
    print("GEMMs alone: cuBLAS per expert vs each kernel (fused: the gated GEMM with the gather "
          "+ the indexed GEMM with the weighted scatter; TF/s = TFLOP/s)")
    header = (f"{'shape':<26} {'cuBLAS ms':>9} {'TF/s':>5} "
              + " ".join(f"{lab + ' ms':>13} {'TF/s':>5}" for lab in labels))
    print(header)
    print("-" * len(header))
    for r in results:
        if r.error:
            continue
        gemm = " ".join(f"{_fmt(r.gemm_ms.get(lab)):>13} {_fmt(r.gemm_tflops.get(lab), '.0f'):>5}"
                        for lab in labels)
        print(f"{r.shape:<26} {_fmt(r.gemm_cublas_ms):>9} {_fmt(r.cublas_tflops, '.0f'):>5} {gemm}")
    bad_layers = {r.shape: r.rel_diff_fused for r in results
                  if r.error is None and (r.rel_diff_fused or 0.0) > 3e-2}
    for shape, diff in bad_layers.items():
        print(f"WARNING {shape}: the fused layer differs from the loop: {diff:.2e}")
    bad = {r.shape: r.gemm_rel_diff for r in results
           if r.error is None and max(r.gemm_rel_diff.values(), default=0.0) > 2e-2}
    for shape, diffs in bad.items():
        print(f"WARNING {shape}: GEMM output differs from cuBLAS: {diffs}")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"card": card, "torch": torch.__version__, "dtype": "bfloat16",
                   "results": [asdict(r) for r in results]}, f, indent=2)
    ok = all(r.error is None for r in results) and not bad and not bad_layers
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
