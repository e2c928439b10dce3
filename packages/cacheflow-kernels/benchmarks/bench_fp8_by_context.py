"""FP8 against 16-bit decode caches by context: each call's fixed cost and its cost per token.

    python packages/cacheflow-kernels/benchmarks/bench_fp8_by_context.py --out fp8ctx.json

Times decode shapes (GQA-8 at batch 1 and 8, MHA at batch 1; head size 128, float16 query) over
contexts 2k-32k with a 16-bit and an FP8 E4M3 cache, through ``bench_paged_attention.py`` at the
automatic plan (graph replays), then fits a line through the points from ``--fit-from`` tokens on:
the intercept is what a call costs whatever its bytes (launches, the merge of a split, the chain of
dependent memory round trips), the slope what each 1,024 tokens of context cost. Issue 13 asks
for FP8 calls 1.7x faster than 16-bit ones at 8k and 32k; that ratio of whole calls is bounded by
the fixed cost: (F + S16) / (F + S8) with S16, S8 the bytes' time of each. Prints both fits per
shape and the speed-up at each context; writes ``bench_paged_attention.py``'s JSON plus ``fits``.
"""

from __future__ import annotations

import argparse
import sys

import bench_paged_attention as bench

# (tag, num_kv_heads, batch) with 32 query heads at head size 128.
SHAPES = [("gqa8", 4, 1), ("mha", 32, 1), ("gqa8", 4, 8)]
CONTEXTS = (2048, 4096, 8192, 16384, 32768)


def case_name(tag: str, batch: int, ctx: int, fp8: bool) -> str:
    """The name under which a shape, context and cache type is registered."""
    return f"ctx_{tag}_b{batch}_ctx{ctx}{'_fp8' if fp8 else ''}"


def add_cases() -> list[str]:
    """Registers every shape, context and cache type as a bench_paged_attention case."""
    names = []
    for tag, kv, batch in SHAPES:
        for ctx in CONTEXTS:
            for fp8 in (False, True):
                name = case_name(tag, batch, ctx, fp8)
                bench.CASES.append(bench.Case(name, batch, ctx, num_kv_heads=kv, fp8=fp8))
                names.append(name)
    return names


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys against xs (at least two distinct xs)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def fits(times: dict[str, float], fit_from: int) -> list[dict]:
    """Per shape and cache type: times by context, slope (us per 1,024 tokens) and intercept."""
    rows = []
    for tag, _, batch in SHAPES:
        for fp8 in (False, True):
            ys = [times.get(case_name(tag, batch, c, fp8), float("nan")) for c in CONTEXTS]
            pts = [(c, y) for c, y in zip(CONTEXTS, ys) if c >= fit_from and y == y]
            slope = intercept = float("nan")
            if len({c for c, _ in pts}) >= 2:
                slope, intercept = fit_line([c for c, _ in pts], [y for _, y in pts])
            rows.append({"shape": f"{tag}_b{batch}", "cache": "fp8" if fp8 else "16-bit",
                         "times_us": ys, "slope_us_per_1k": slope * 1024,
                         "intercept_us": intercept})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    p.add_argument("--fit-from", type=int, default=8192,
                   help="fit the line through contexts of at least this many tokens")
    args = p.parse_args(argv)
    report = bench.run_sweep(args.out, add_cases())
    if report is None:
        return 1
    times = {r["case"]: r["time_us"] for r in report["results"] if not r.get("error")}
    report["fits"] = fits(times, args.fit_from)
    print(f"\nfixed cost and cost per 1,024 tokens (line through contexts >= {args.fit_from}):")
    for row in report["fits"]:
        cells = " ".join(f"{t:7.1f}" for t in row["times_us"])
        print(f"  {row['shape']:9s} {row['cache']:6s} us at {CONTEXTS}: {cells}   slope "
              f"{row['slope_us_per_1k']:.3f}  intercept {row['intercept_us']:.2f}")
    by_shape = {(r["shape"], r["cache"]): r for r in report["fits"]}
    for tag, _, batch in SHAPES:
        shape = f"{tag}_b{batch}"
        half, fp8 = by_shape[(shape, "16-bit")], by_shape[(shape, "fp8")]
        ratios = " ".join(f"{a / b:.2f}" for a, b in zip(half["times_us"], fp8["times_us"]))
        print(f"  {shape:9s} FP8 speed-up by context: {ratios}; slope ratio "
              f"{half['slope_us_per_1k'] / fp8['slope_us_per_1k']:.2f}")
    bench.save_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
