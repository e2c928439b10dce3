"""How close the automatic split plan of paged_attention comes to the best fixed partition size.

    python packages/cacheflow-kernels/benchmarks/bench_split_plan.py --out plan.json
    python .../bench_split_plan.py --grid wide --partitions 0,256,512,704,768,1024,1536 --out w.json
    python .../bench_split_plan.py --grid survey --match plan_mqa_b1_ --counts 16,32,64 --out m.json

Times a grid of decode shapes (``--grid short``, the default: short contexts, where a split's
merge weighs most: batches 1-64, contexts 512-2048, MHA / GQA-4 at head size 64 / GQA-8 / MQA
at 128; ``--grid wide``: the 16 shapes, contexts 2k-6k, where unsplit grids of 4-64 wide CTAs
compete with splits, whose sweep set ``_WIDE_FULL_RATE_SHARE``; ``--grid pair``: grids of one to
two CTAs per SM at head sizes 64-96, whose sweep set ``_PAIR_GRID_SATURATION``; ``--grid
survey``: about a hundred shapes spread over grids of a few CTAs to several waves, head sizes
64 / 128 / 256, MHA to MQA, contexts 1k-32k and a few FP8 caches, the data for fitting a cost
model; ``--grid shapes --shapes mqa:32:1:128:64:2048,...``: the shapes named, timed like the
survey) with
``bench_paged_attention.py`` at its automatic plan and at fixed partition sizes (0 = no split),
then prints, per shape, the plan the planner picks, its time, the fastest fixed size and the
ratio of the two (the plan's regret). ``--partitions`` names the fixed sizes, or ``--counts``
partition counts turned into each shape's sizes (``--grid survey`` takes 2, 3, 4, 6, 8, 12, 16
and 32 partitions by default, SDPA on the gathered K/V included); the planner's pick
is timed as the automatic plan, so a pick outside them still has a time. The planner's cost model
(``_attention_ops.plan_time``) was fitted on this grid on an H100 (2026-12-06,
docs/benchmarks.md); rerun it on another card before trusting the model there. Writes
``bench_paged_attention.py``'s JSON plus a ``regret`` list.
"""

from __future__ import annotations

import argparse
import math
import sys

import bench_paged_attention as bench

# (tag, num_heads, num_kv_heads, head_size, batches, contexts)
GRID = [
    ("mqa", 32, 1, 128, (8, 16, 32, 64), (512, 1024)),
    ("gqa8", 32, 4, 128, (4, 8, 16), (512, 1024)),
    ("mha", 32, 32, 128, (1, 2, 4), (512, 1024, 2048)),
    ("gqa4d64", 32, 8, 64, (8,), (512, 1024)),
]


# (tag, num_heads, num_kv_heads, head_size, batch, context): 4-64 wide CTAs unsplit.
WIDE_GRID = [
    ("mha", 32, 32, 128, 1, 2048), ("mha", 32, 32, 128, 2, 3072), ("mha", 32, 32, 128, 2, 4096),
    ("mha", 32, 32, 128, 2, 6144), ("gqa8", 32, 4, 128, 1, 2048), ("gqa8", 32, 4, 128, 2, 2048),
    ("gqa8", 32, 4, 128, 4, 2048), ("gqa8", 32, 4, 128, 8, 2048), ("gqa8", 32, 4, 128, 16, 3072),
    ("gqa8", 32, 4, 128, 16, 4096), ("gqa8", 32, 4, 128, 16, 6144),
    ("gqa4d64", 32, 8, 64, 1, 3072), ("gqa4d64", 32, 8, 64, 2, 3072),
    ("gqa4d64", 32, 8, 64, 4, 3072), ("gqa4d64", 32, 8, 64, 8, 4096),
    ("gqa4d64", 32, 8, 64, 8, 6144),
]


# Grids of one to two 16-row CTAs per SM (on 132 SMs) at head sizes up to 96, which the planner
# now runs unsplit (_PAIR_GRID_SATURATION; H100 2026-12-06: 2-21% faster than the two-way splits
# planned before), and one it still splits.
PAIR_GRID = [
    ("gqa4d64", 32, 8, 64, 32, 2048), ("gqa8d64", 32, 4, 64, 64, 2048),
    ("mhad64", 32, 32, 64, 8, 4096), ("mqad64", 32, 1, 64, 96, 2048),
    ("gqa4d80", 32, 8, 80, 32, 4096), ("mhad96", 16, 16, 96, 16, 8192),
    ("mhad64", 32, 32, 64, 8, 16384), ("gqa4d64", 32, 8, 64, 24, 3072),
]


# (tag, num_heads, num_kv_heads, head_size, batches, contexts, fp8): unsplit grids of 4 to about
# 1,000 CTAs (16-row CTAs; MQA's 32-head groups take one or two), four head-group shapes and three
# head sizes, contexts 1k-32k (the largest case reads about 4.3 GB of K/V).
SURVEY_GRID = [
    ("mha", 32, 32, 128, (1, 2, 4, 6, 8, 16), (1024, 4096, 16384), False),
    ("mha", 32, 32, 128, (1, 2, 4), (32768,), False),
    ("gqa8", 32, 4, 128, (1, 4, 8, 16, 33, 48, 64, 128), (1024, 4096, 16384), False),
    ("gqa8", 32, 4, 128, (1, 2, 8), (32768,), False),
    ("gqa4d64", 32, 8, 64, (1, 4, 8, 17, 24, 32, 64), (1024, 4096, 16384), False),
    ("mqa", 32, 1, 128, (8, 32, 72, 128, 256), (1024, 4096), False),
    ("mqa", 32, 1, 128, (1, 8, 32), (16384,), False),
    ("mhad256", 16, 16, 256, (1, 4, 8, 16), (1024, 4096, 16384), False),
    ("mhad64", 32, 32, 64, (1, 4, 8), (4096, 16384), False),
    # plans of the 2026-12-06 planner that no fixed count of the first survey timed
    ("gqa8d64", 32, 4, 64, (1, 2), (2048,), False),
    ("gqa4d64", 32, 8, 64, (24,), (3072,), False),
    ("mqa", 32, 1, 128, (1,), (4096, 32768), False),
    # plans a merge share reaching its full cost at 1.5 split CTAs per SM instead of 1 would
    # move (a candidate fix for GQA-8 d64 batch 2 at 2k; timed 2026-12-07 02:10)
    ("gqa8", 32, 4, 128, (3,), (1024,), False),
    ("gqa8", 32, 4, 128, (2,), (6144,), False),
    ("gqa4", 32, 8, 128, (2,), (1536,), False),
    ("gqa4", 32, 8, 128, (3,), (2048,), False),
    ("gqa4", 32, 8, 128, (1,), (6144,), False),
    ("mqa", 32, 1, 128, (12,), (512,), False),
    ("mqa", 32, 1, 128, (24,), (1024,), False),
    ("gqa4d64", 32, 8, 64, (1,), (2048,), False),
    ("smollm", 9, 3, 64, (3,), (2048,), False),
    ("mhad256h32", 32, 32, 256, (1,), (512,), False),
    ("mqah48", 48, 1, 128, (16,), (1024,), False),
    # plans a merge share reaching its full cost at 2.25 split CTAs per SM would move (timed
    # 2026-12-07 02:35)
    ("gqa4", 32, 8, 128, (6,), (4096, 6144), False),
    ("mqa", 32, 1, 128, (24,), (4096,), False),
    ("mqa", 32, 1, 128, (48,), (1024, 1536), False),
    ("mqa", 32, 1, 128, (12,), (1536,), False),
    ("mqa", 32, 1, 128, (16,), (768,), False),
    ("mqah48", 48, 1, 128, (24,), (2048,), False),
    ("mqah48", 48, 1, 128, (12,), (1024,), False),
    ("mhad256h32", 32, 32, 256, (3,), (2048,), False),
    ("mhad256", 16, 16, 256, (6,), (1024,), False),
    ("gqa4d256", 32, 8, 256, (4,), (512,), False),
    ("gqa4d256", 32, 8, 256, (12,), (2048,), False),
    ("smollm", 9, 3, 64, (6,), (2048,), False),
    ("smollm", 9, 3, 64, (8,), (3072,), False),
    ("gqa3", 9, 3, 128, (12,), (8192,), False),
    ("gqa4d64", 32, 8, 64, (3,), (3072,), False),
    ("gqa8d64", 32, 4, 64, (4,), (2048,), False),
    # plans the refit merge cost (512 token-units, full from 2 split CTAs per SM) moves that
    # no sweep has timed yet
    ("mhad64", 32, 32, 64, (24,), (2048,), False),
    ("gqa4d64", 32, 8, 64, (96,), (2048,), False),
    ("smollm", 9, 3, 64, (256,), (2048,), False),
    ("mhad64h16", 16, 16, 64, (48,), (2048,), False),
    ("gqa3", 9, 3, 128, (24,), (12288,), False),
    ("gqa3", 9, 3, 128, (16,), (4096,), False),
    ("gqa4", 32, 8, 128, (3,), (1024,), False),
    ("gqa8", 32, 4, 128, (6,), (1536,), False),
    ("qwen", 14, 2, 128, (24,), (4096,), False),
    ("mhad256h32", 32, 32, 256, (3,), (768,), False),
    ("gqa4d256", 32, 8, 256, (12,), (1024,), False),
    ("gqa8d256", 32, 4, 256, (24,), (1024,), False),
    ("mqah48", 48, 1, 128, (32,), (1024,), False),
    ("mqah48", 48, 1, 128, (6,), (16384,), False),
    ("mqad256", 32, 1, 256, (48,), (1536,), False),
    ("gqa3d256", 9, 3, 256, (6,), (32768,), False),
    # plans a merge share by the unsplit grid's CTAs per SM (full from half the SMs) would move
    # away from both the refit and the earlier cost (candidate of 2026-12-07 05:00)
    ("mhad64", 32, 32, 64, (1,), (3072,), False),
    ("gqa4d64", 32, 8, 64, (4,), (3072,), False),
    ("gqa4d64", 32, 8, 64, (6,), (4096,), False),
    ("gqa8d64", 32, 4, 64, (6,), (2048,), False),
    ("gqa8d64", 32, 4, 64, (8,), (3072,), False),
    ("gqa8d64", 32, 4, 64, (12,), (4096,), False),
    ("smollm", 9, 3, 64, (12,), (3072,), False),
    ("smollm", 9, 3, 64, (16,), (4096,), False),
    ("qwend64", 14, 2, 64, (12,), (2048,), False),
    ("qwend64", 14, 2, 64, (16,), (3072,), False),
    ("qwend64", 14, 2, 64, (24,), (4096,), False),
    ("gqa8h64d64", 64, 8, 64, (3,), (2048,), False),
    ("gqa8h64d64", 64, 8, 64, (4,), (3072,), False),
    ("gqa8h64d64", 64, 8, 64, (6,), (4096,), False),
    ("mhad64h16", 16, 16, 64, (2,), (3072,), False),
    ("mhad64h16", 16, 16, 64, (3,), (4096,), False),
    ("mha", 32, 32, 128, (1,), (2048,), False),
    ("gqa4", 32, 8, 128, (4,), (2048,), False),
    ("gqa8", 32, 4, 128, (8,), (2048,), False),
    ("gqa8", 32, 4, 128, (12,), (4096,), False),
    ("gqa3", 9, 3, 128, (12,), (2048,), False),
    ("qwen", 14, 2, 128, (16,), (2048,), False),
    ("gqa8h64", 64, 8, 128, (4,), (2048,), False),
    ("gqa8h64", 64, 8, 128, (6,), (4096,), False),
    ("mhah16", 16, 16, 128, (2,), (2048,), False),
    ("mhah16", 16, 16, 128, (3,), (4096,), False),
    ("mha", 32, 32, 128, (1, 4, 16), (8192, 32768), True),
    ("gqa8", 32, 4, 128, (1, 8, 32), (8192, 32768), True),
]
SURVEY_COUNTS = "2,3,4,6,8,12,16,32"


def grid_shapes(grid: str) -> list[tuple[str, int, int, int, int, int]]:
    """The (tag, heads, KV heads, head size, batch, context) shapes of ``grid`` (for
    ``survey``: 16-bit shapes only; :func:`add_cases` adds its FP8 ones)."""
    if grid == "survey":
        return [(tag, heads, kv, d, batch, ctx)
                for tag, heads, kv, d, batches, contexts, fp8 in SURVEY_GRID if not fp8
                for batch in batches for ctx in contexts]
    if grid == "wide":
        return list(WIDE_GRID)
    if grid == "pair":
        return list(PAIR_GRID)
    return [(tag, heads, kv, head_size, batch, ctx)
            for tag, heads, kv, head_size, batches, contexts in GRID
            for batch in batches for ctx in contexts]


def parse_shapes(text: str) -> list[tuple[str, int, int, int, int, int]]:
    """``--shapes``: comma-separated ``TAG:HEADS:KV_HEADS:HEAD_SIZE:BATCH:CONTEXT`` entries, as
    (tag, heads, KV heads, head size, batch, context) tuples; a malformed entry raises
    ValueError naming it."""
    shapes = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        try:
            if len(parts) != 6:
                raise ValueError
            tag, numbers = parts[0], [int(v) for v in parts[1:]]
            if not tag or min(numbers) < 1 or numbers[0] % numbers[1]:
                raise ValueError
        except ValueError:
            raise ValueError(f"--shapes entry {entry!r}: expected TAG:HEADS:KV_HEADS:HEAD_SIZE:"
                             "BATCH:CONTEXT with positive integers and HEADS a multiple of "
                             "KV_HEADS") from None
        shapes.append((tag, *numbers))
    return shapes


def add_cases(grid: str = "short", shapes_text: str = "") -> list[str]:
    """Registers the grid's shapes (``grid == "shapes"``: those of ``shapes_text``) as
    bench_paged_attention cases; returns their names."""
    names = []
    listed = parse_shapes(shapes_text) if grid == "shapes" else grid_shapes(grid)
    shapes = [(*shape, False) for shape in listed]
    if grid == "survey":
        shapes += [(tag, heads, kv, d, batch, ctx, True)
                   for tag, heads, kv, d, batches, contexts, fp8 in SURVEY_GRID if fp8
                   for batch in batches for ctx in contexts]
    for tag, heads, kv, head_size, batch, ctx, fp8 in shapes:
        name = f"plan_{tag}_b{batch}_ctx{ctx}{'_fp8' if fp8 else ''}"
        bench.CASES.append(bench.Case(name, batch, ctx, num_heads=heads, num_kv_heads=kv,
                                      head_size=head_size, fp8=fp8))
        names.append(name)
    return names


def count_sizes(ctx: int, counts: list[int]) -> list[int]:
    """Partition sizes that cut ``ctx`` into each of ``counts`` partitions as the planner rounds
    them (``split_of``), distinct, with 0 (no split) first; counts that round to no split or to a
    size already listed are dropped."""
    from cacheflow_kernels._attention_ops import split_of

    sizes = [0]
    for k in counts:
        size, _ = split_of(ctx, k)
        if size and size not in sizes:
            sizes.append(size)
    return sizes


def run_counts(out: str, names: list[str], counts: list[int], sdpa: bool) -> dict | None:
    """Like ``bench.run_sweep``, but each case gets the partition sizes of ``counts`` for its own
    context (:func:`count_sizes`), and SDPA on the gathered K/V when ``sdpa``."""
    torch = bench.cuda_torch()
    if torch is None:
        return None
    import cacheflow_kernels as ck

    args = bench.parse_args(["--out", out, "--partitions", "", "--l2-prefetch", ""]
                            + ([] if sdpa else ["--skip-sdpa"]))
    runner = bench.Bench(torch, args)
    runner.measure_copy()
    by_name = {c.name: c for c in bench.CASES}
    try:
        from tqdm import tqdm
        progress = tqdm(names, desc="shapes", unit="shape")
    except ImportError:
        progress = names
    report: dict = {
        "device": runner.device_name, "num_sms": runner.num_sms, "l2_bytes": runner.l2_bytes,
        "copy_gbps": runner.copy_gbps, "torch": torch.__version__,
        "cacheflow_kernels": ck.__version__, "results": [],
    }
    for name in progress:
        case = by_name[name]
        result = runner.run_case(case, count_sizes(case.ctx, counts), [])
        report["results"].append(bench.asdict(result))
        bench.save_report(out, report)  # a run cut short keeps the shapes it timed
    return report


def regrets(results: list[dict]) -> list[dict]:
    """Per case: the automatic plan's partitions and time, the fastest fixed size and its time."""
    rows = []
    for r in results:
        if r.get("error"):
            continue
        timed = {int(size): us for size, us in r["partitions"].items() if not math.isnan(us)}
        best_size = min(timed, key=timed.get)
        rows.append({"case": r["case"], "plan": [r["num_partitions"], r["partition_size"]],
                     "plan_us": r["time_us"], "best_size": best_size,
                     "best_us": timed[best_size], "regret": r["time_us"] / timed[best_size]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    p.add_argument("--partitions", default="0,256,512,1024",
                   help="fixed partition sizes to time (0 = no split)")
    p.add_argument("--counts", default="",
                   help="partition counts, turned into each shape's sizes (replaces "
                        f"--partitions; survey default {SURVEY_COUNTS})")
    p.add_argument("--grid", choices=("short", "wide", "pair", "survey", "shapes"),
                   default="short",
                   help="which shapes: short contexts, the wide-CTA shapes at 2k-6k, grids "
                        "of one to two CTAs per SM at head sizes 64-96, the model-fitting "
                        "survey, or those of --shapes")
    p.add_argument("--shapes", default="",
                   help="with --grid shapes: comma-separated TAG:HEADS:KV_HEADS:HEAD_SIZE:"
                        "BATCH:CONTEXT (e.g. mqa:32:1:128:64:2048), timed with SDPA like the "
                        "survey")
    p.add_argument("--limit", type=int, default=0, help="only the first N shapes (0 = all)")
    p.add_argument("--match", default="",
                   help="comma-separated substrings: only the shapes whose case name (e.g. "
                        "plan_mqa_b1_ctx16384) contains one of them")
    args = p.parse_args(argv)
    if (args.grid == "shapes") != bool(args.shapes):
        p.error("--shapes goes with --grid shapes, and --grid shapes needs --shapes")
    try:
        names = add_cases(args.grid, args.shapes)
    except ValueError as exc:
        p.error(str(exc))
    patterns = [m.strip() for m in args.match.split(",") if m.strip()]
    if patterns:
        names = [n for n in names if any(m in n for m in patterns)]
        if not names:
            p.error(f"--match {args.match!r} selects none of the {args.grid} grid's shapes")
    if args.limit:
        names = names[:args.limit]
    counts = args.counts or (SURVEY_COUNTS if args.grid in ("survey", "shapes") else "")
    if counts:
        report = run_counts(args.out, names, [int(k) for k in counts.split(",") if k.strip()],
                            sdpa=args.grid in ("survey", "shapes"))
    else:
        report = bench.run_sweep(args.out, names, args.partitions)
    if report is None:
        return 1
    report["regret"] = regrets(report["results"])
    print("\nautomatic plan against the fastest fixed partition size (us):")
    for row in report["regret"]:
        parts, size = row["plan"]
        print(f"  {row['case']:24s} plan {parts:3d} x {size:5d} {row['plan_us']:8.2f}   "
              f"best {row['best_size']:5d} {row['best_us']:8.2f}   x{row['regret']:.3f}")
    bench.save_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
