"""What a split decode call costs over the same bytes read unsplit, and over a plain read.

    python packages/cacheflow-kernels/benchmarks/bench_split_cost.py --out split_cost.json

Two measurements, both graph replays with buffers rotated past L2 (``bench_timing``):

1. The floor of a one-kernel read of N bytes on this card: torch row sums over a float16
   [N / 8192, 4096] tensor (every byte read once, N / 4096 bytes written) at 17-281 MB, and a
   line through them (intercept: what any read kernel of this length pays for launch, ramp and
   tail; slope: the read rate).
2. Split decode shapes (batch 1, a long context, the automatic plan) against an unsplit twin
   that reads the same K/V bytes with the same CTAs and the same tokens per CTA (batch P at
   context C / P, P being the split's partitions), 16-bit and FP8 caches, through
   ``bench_paged_attention.py``'s harness. The difference is what the split's merge costs after
   the whole grid has finished, whichever kernel does it.

Issue 13's FP8 target (1.7x over 16-bit at 8k and 32k) is a ratio of whole calls, so at GQA-8
batch 1 it is bounded by these two costs (docs/benchmarks.md, 2026-12-06 15:16). Prints both
tables; writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import bench_paged_attention as bench
from bench_fp8_by_context import fit_line
from bench_timing import copy_bandwidth, cuda_torch, time_graph_us

READ_MB = (16, 33.5, 67, 134, 268)
# (tag, num_kv_heads, context of the split call); 32 query heads, head size 128, batch 1.
SPLIT_SHAPES = (("gqa8", 4, 32768), ("gqa8", 4, 8192), ("mha", 32, 32768), ("mqa", 1, 32768))


def read_floor(torch: Any, copy_gbps: float, l2_bytes: int) -> dict[str, Any]:
    """Row-sum times by size and the line through them (us, GB/s)."""
    rows = []
    for mb in READ_MB:
        n_rows = int(mb * (1 << 20)) // (2 * 4096)
        nbytes = n_rows * 4096 * 2
        sets = max(2, math.ceil(3 * l2_bytes / nbytes))
        xs = [torch.randn(n_rows, 4096, device="cuda", dtype=torch.float16) for _ in range(sets)]
        out = torch.empty(n_rows, device="cuda", dtype=torch.float16)
        us = time_graph_us(torch, [lambda x=x, o=out: torch.sum(x, dim=1, out=o) for x in xs],
                           calls_per_graph=40)
        rows.append({"bytes": nbytes, "row_sum_us": us,
                     "bytes_at_copy_us": nbytes / (copy_gbps * 1e3)})
        del xs, out
        torch.cuda.empty_cache()
    slope, intercept = fit_line([r["bytes"] for r in rows], [r["row_sum_us"] for r in rows])
    return {"rows": rows, "intercept_us": intercept, "read_gbps": 1e-3 / slope}


def split_pairs(harness: bench.Bench) -> list[dict[str, Any]]:
    """Each split shape and its unsplit twin, 16-bit and FP8: times, plans, bytes at copy."""
    from cacheflow_kernels._attention_ops import plan_partitions

    pairs = []
    for tag, kv, ctx in SPLIT_SHAPES:
        size, parts = plan_partitions(1, 32, kv, ctx, harness.num_sms, head_size=128)
        if parts < 2:
            print(f"{tag} ctx{ctx}: not split on this card; skipped", file=sys.stderr)
            continue
        for fp8 in (False, True):
            sfx = "_fp8" if fp8 else ""
            split = bench.Case(f"split_{tag}_b1_ctx{ctx}{sfx}", 1, ctx, num_kv_heads=kv, fp8=fp8)
            twin = bench.Case(f"unsplit_{tag}_b{parts}_ctx{ctx // parts}{sfx}", parts,
                              ctx // parts, num_kv_heads=kv, fp8=fp8)
            s = harness.run_case(split, [], [])
            u = harness.run_case(twin, [0], [])
            unsplit_us = u.partitions.get("0", float("nan"))
            pairs.append({"shape": f"{tag}{sfx} ctx{ctx}", "plan": f"{parts} x {size}",
                          "split_us": s.time_us, "twin": twin.name, "unsplit_us": unsplit_us,
                          "split_minus_unsplit_us": (s.time_us or math.nan) - unsplit_us,
                          "bytes_at_copy_us": s.bytes_moved / (harness.copy_gbps * 1e3)})
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    args = p.parse_args(argv)
    torch = cuda_torch()
    if torch is None:
        return 1
    harness = bench.Bench(torch, bench.parse_args(["--out", args.out, "--partitions", "",
                                                   "--l2-prefetch", "", "--skip-sdpa"]))
    copy_gbps = copy_bandwidth(torch) / 1e9
    harness.copy_gbps = copy_gbps
    print(f"{harness.device_name}: {harness.num_sms} SMs, copy {copy_gbps:.0f} GB/s "
          "(read + write)")
    floor = read_floor(torch, copy_gbps, harness.l2_bytes)
    print("\none-kernel read (torch row sums), us:")
    for r in floor["rows"]:
        print(f"  {r['bytes'] / 1e6:7.1f} MB  {r['row_sum_us']:8.2f}   bytes at copy "
              f"{r['bytes_at_copy_us']:8.2f}")
    print(f"  line: {floor['intercept_us']:.2f} us + bytes at {floor['read_gbps']:.0f} GB/s")
    pairs = split_pairs(harness)
    print("\nsplit call against its unsplit twin (same bytes, CTAs, tokens per CTA), us:")
    print(f"  {'shape':22s} {'plan':>10s} {'split':>8s} {'unsplit':>8s} {'diff':>6s} "
          f"{'at copy':>8s}")
    for r in pairs:
        print(f"  {r['shape']:22s} {r['plan']:>10s} {r['split_us']:8.2f} {r['unsplit_us']:8.2f} "
              f"{r['split_minus_unsplit_us']:6.2f} {r['bytes_at_copy_us']:8.2f}")
    report = {"device": harness.device_name, "num_sms": harness.num_sms, "copy_gbps": copy_gbps,
              "torch": torch.__version__, "read_floor": floor, "split_pairs": pairs}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
