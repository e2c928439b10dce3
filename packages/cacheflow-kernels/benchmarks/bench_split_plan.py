"""How close the automatic split plan of paged_attention comes to the best fixed partition size.

    python packages/cacheflow-kernels/benchmarks/bench_split_plan.py --out plan.json
    python .../bench_split_plan.py --grid wide --partitions 0,256,512,704,768,1024,1536 --out w.json

Times a grid of decode shapes (``--grid short``, the default: short contexts, where a split's
merge weighs most: batches 1-64, contexts 512-2048, MHA / GQA-4 at head size 64 / GQA-8 / MQA
at 128; ``--grid wide``: the 16 shapes, contexts 2k-6k, where unsplit grids of 4-64 wide CTAs
compete with splits, whose sweep set ``_WIDE_FULL_RATE_SHARE``; ``--grid pair``: grids of one to
two CTAs per SM at head sizes 64-96, whose sweep set ``_PAIR_GRID_SATURATION``) with
``bench_paged_attention.py`` at its automatic plan and at fixed partition sizes (0 = no split),
then prints, per shape, the plan the planner picks, its time, the fastest fixed size and the
ratio of the two (the plan's regret). ``--partitions`` names the fixed sizes; the planner's pick
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


def grid_shapes(grid: str) -> list[tuple[str, int, int, int, int, int]]:
    """The (tag, heads, KV heads, head size, batch, context) shapes of ``grid``."""
    if grid == "wide":
        return list(WIDE_GRID)
    if grid == "pair":
        return list(PAIR_GRID)
    return [(tag, heads, kv, head_size, batch, ctx)
            for tag, heads, kv, head_size, batches, contexts in GRID
            for batch in batches for ctx in contexts]


def add_cases(grid: str = "short") -> list[str]:
    """Registers the grid's shapes as bench_paged_attention cases; returns their names."""
    names = []
    for tag, heads, kv, head_size, batch, ctx in grid_shapes(grid):
        name = f"plan_{tag}_b{batch}_ctx{ctx}"
        bench.CASES.append(bench.Case(name, batch, ctx, num_heads=heads, num_kv_heads=kv,
                                      head_size=head_size))
        names.append(name)
    return names


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
    p.add_argument("--grid", choices=("short", "wide", "pair"), default="short",
                   help="which shapes: short contexts, the wide-CTA shapes at 2k-6k, or grids "
                        "of one to two CTAs per SM at head sizes 64-96")
    args = p.parse_args(argv)
    report = bench.run_sweep(args.out, add_cases(args.grid), args.partitions)
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
