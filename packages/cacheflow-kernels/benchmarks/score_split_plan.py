"""Scores the split planner against timed partition sweeps, on the CPU.

    python packages/cacheflow-kernels/benchmarks/score_split_plan.py \
        packages/cacheflow-kernels/benchmarks/results/split_survey_h100_2026-12-06.json
    python .../score_split_plan.py SURVEY.json MORE.json --merge-full-ctas-per-sm 1.5

Reads ``bench_split_plan.py`` reports (each shape's time at fixed partition sizes; later files add
sizes and shapes), asks ``plan_partitions`` for each shape's plan on the report's SM count, and
prints the mean and worst ratio of the plan's time to the shape's fastest timed size, the shapes
whose plan no sweep timed, and, with ``--merge-full-ctas-per-sm``, the plans a merge cost that
reaches its full value at that many split CTAs per SM (instead of one) would change. A what-if
for fitting the cost model before a GPU run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from cacheflow_kernels import _attention_ops as ops

_SHAPE = re.compile(r"b(\d+) ctx(\d+) h(\d+)/kv(\d+) d(\d+)")


def load_shapes(paths: list[str]) -> tuple[dict[str, dict], int]:
    """``{case: {batch, ctx, heads, kv, head_size, times: {size: us}}}`` over the reports, and the
    SM count of the first."""
    shapes: dict[str, dict] = {}
    num_sms = 0
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        num_sms = num_sms or int(report["num_sms"])
        for r in report["results"]:
            match = _SHAPE.match(r["shape"])
            if match is None or r.get("error"):
                continue
            batch, ctx, heads, kv, head_size = map(int, match.groups())
            times = {int(size): us for size, us in (r["partitions"] or {}).items()
                     if isinstance(us, (int, float)) and us == us}
            entry = shapes.setdefault(r["case"], dict(batch=batch, ctx=ctx, heads=heads, kv=kv,
                                                      head_size=head_size, times={}))
            for size, us in times.items():
                entry["times"].setdefault(size, us)
    return shapes, num_sms


def plans(shapes: dict[str, dict], num_sms: int) -> dict[str, int]:
    """Each shape's planned partition size (0: no split)."""
    out = {}
    for case, s in shapes.items():
        ops._WAVE_PLANS.clear()
        size, _ = ops.plan_partitions(s["batch"], s["heads"], s["kv"], s["ctx"], num_sms,
                                      head_size=s["head_size"])
        out[case] = size
    return out


def report(shapes: dict[str, dict], picked: dict[str, int], label: str) -> None:
    """Prints the plan's regret over the shapes whose plan was timed."""
    ratios, untimed = [], []
    for case, s in sorted(shapes.items()):
        us = s["times"].get(picked[case])
        if us is None:
            untimed.append(f"{case} ({picked[case]})")
            continue
        ratios.append((us / min(s["times"].values()), case, picked[case]))
    ratios.sort(reverse=True)
    mean = sum(r for r, _, _ in ratios) / max(len(ratios), 1)
    print(f"{label}: mean plan / best {mean:.4f} over {len(ratios)} shapes; worst: "
          + ", ".join(f"{case} {size} x{r:.3f}" for r, case, size in ratios[:5]))
    if untimed:
        print(f"  plans no sweep timed: {', '.join(untimed)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="bench_split_plan.py JSON reports")
    p.add_argument("--merge-full-ctas-per-sm", type=float, default=0.0,
                   help="also score a merge cost that is full from this many split CTAs per SM")
    args = p.parse_args(argv)
    shapes, num_sms = load_shapes(args.reports)
    if not shapes:
        p.error(f"no timed shapes in {', '.join(args.reports)}")
    current = plans(shapes, num_sms)
    report(shapes, current, "current planner")
    if args.merge_full_ctas_per_sm > 0:
        full = args.merge_full_ctas_per_sm
        original = ops.merge_cost
        ops.merge_cost = lambda ctas, sms: ops._MERGE_FIXED_TOKENS * max(
            ops._MERGE_MIN_SHARE, min(1.0, ctas / (full * sms)))
        try:
            candidate = plans(shapes, num_sms)
        finally:
            ops.merge_cost = original
            ops._WAVE_PLANS.clear()
        report(shapes, candidate, f"merge full from {full} CTAs per SM")
        for case in sorted(c for c in shapes if candidate[c] != current[c]):
            times = shapes[case]["times"]
            print(f"  moves {case}: {current[case]} ({times.get(current[case])} us) -> "
                  f"{candidate[case]} ({times.get(candidate[case])} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
