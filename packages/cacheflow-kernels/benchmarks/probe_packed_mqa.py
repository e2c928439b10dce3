"""Probe: can MQA decode run faster through the prefill kernels, its query heads packed as rows?

For one KV head (MQA), a decode query ``[batch, G, D]`` is also a prefill query of ``G`` tokens
of one head per sequence (``query.view(batch * G, 1, D)``), which the prefill kernels compute
in tiles of 64-128 rows, each K/V tile read once for all of them (FlashAttention's "packed
GQA"). The prefill op is causal, so packed row ``j`` sees ``G - 1 - j`` keys fewer than decode
does: the timing is an upper bound of what a packed decode mode of those kernels would reach.
Times (CUDA-graph replays) of ``paged_attention``, of ``paged_prefill_attention`` under each
kernel choice of ``CACHEFLOW_PREFILL_VARIANT``, and of SDPA on the gathered K/V, per shape:

    python packages/cacheflow-kernels/benchmarks/probe_packed_mqa.py --out packed.json

Measured once (H100, 2026-12-07, docs/benchmarks.md): every prefill variant slower than the
decode kernel, so no packed mode was built.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import bench_paged_attention as bpa
from bench_timing import time_graph_us

CASES = [
    bpa.Case("mqa_b128_ctx1k", 128, 1024, num_kv_heads=1),
    bpa.Case("mqa_b256_ctx2k", 256, 2048, num_kv_heads=1),
    bpa.Case("mqa_b64_ctx2k", 64, 2048, num_kv_heads=1),
    bpa.Case("mqa_b32_ctx4k", 32, 4096, num_kv_heads=1),
    bpa.Case("mqa_h48_b32_ctx2k", 32, 2048, num_heads=48, num_kv_heads=1),
    bpa.Case("mqa_h64_b128_ctx1k", 128, 1024, num_heads=64, num_kv_heads=1),
    bpa.Case("mqa_h71_b16_ctx4k_d64", 16, 4096, num_heads=71, num_kv_heads=1, head_size=64),
    bpa.Case("mqa_b128_ctx1k_d64", 128, 1024, num_kv_heads=1, head_size=64),
]

# Prefill kernel choices (paged_prefill.cu reads the variable at each call).
VARIANTS = {"default": None, "wgmma": "wgmma", "wgmma_serial": "wgmma_serial", "mma": "mma",
            "m64": "m64"}
VARIANT_ENV = "CACHEFLOW_PREFILL_VARIANT"


def _time_variant(torch: Any, calls: list[Any], variant: str | None) -> float:
    """Graph-replay microseconds of ``calls`` with the prefill variable set to ``variant``."""
    old = os.environ.get(VARIANT_ENV)
    if variant is None:
        os.environ.pop(VARIANT_ENV, None)
    else:
        os.environ[VARIANT_ENV] = variant
    try:
        return time_graph_us(torch, calls, calls_per_graph=40, replays=15)
    finally:
        if old is None:
            os.environ.pop(VARIANT_ENV, None)
        else:
            os.environ[VARIANT_ENV] = old


def probe_case(torch: Any, bench: bpa.Bench, case: bpa.Case) -> dict[str, Any]:
    """Decode, packed prefill (each variant) and SDPA microseconds of one MQA shape, with the
    K/V read floor at the copy rate measured before."""
    import cacheflow_kernels as ck

    lens = [case.ctx] * case.batch
    sets = [bench.build(case, 1 + i, lens) for i in range(3)]
    scale = case.head_size ** -0.5
    g, b, d = case.num_heads, case.batch, case.head_size
    starts = torch.arange(b + 1, dtype=torch.int32, device="cuda") * g

    def decode(s: dict[str, Any]) -> Any:
        return lambda: ck.paged_attention(
            s["out"], s["query"], s["key_cache"], s["value_cache"], s["block_tables"],
            s["context_lens"], scale, max_context_len=case.ctx)

    def packed(s: dict[str, Any]) -> Any:
        return lambda: ck.paged_prefill_attention(
            s["out"].view(b * g, 1, d), s["query"].view(b * g, 1, d), s["key_cache"],
            s["value_cache"], s["block_tables"], starts, s["context_lens"], scale,
            max_query_len=g)

    res: dict[str, Any] = {"case": case.name}
    res["decode"] = time_graph_us(torch, [decode(s) for s in sets], calls_per_graph=40,
                                  replays=15)
    for name, variant in VARIANTS.items():
        res[name] = _time_variant(torch, [packed(s) for s in sets], variant)
    res["sdpa"], _ = bench.time_sdpa(case, sets, [])
    res["floor_us"] = b * case.ctx * d * 2 * 2 / (bench.copy_gbps * 1e3)
    return res


def main() -> int:
    """Runs every case, prints a line each and writes the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON report")
    args = parser.parse_args()
    import torch

    bench = bpa.Bench(torch, bpa.parse_args(["--out", args.out]))
    print(torch.cuda.get_device_name(0), f"copy {bench.measure_copy():.0f} GB/s")
    rows = []
    for case in CASES:
        res = probe_case(torch, bench, case)
        rows.append(res)
        times = " ".join(f"{k} {res[k]:.1f}" for k in ("decode", "sdpa", "floor_us", *VARIANTS))
        print(f"{case.name:24s} {times}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": bench.device_name, "copy_gbps": bench.copy_gbps, "results": rows},
                  f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
