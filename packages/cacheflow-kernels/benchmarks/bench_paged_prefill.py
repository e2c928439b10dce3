"""Benchmark of paged_prefill_attention against torch SDPA (flash backend) and a bf16 matmul.

For each case the paged problem (K/V already in a shuffled paged cache) and its dense equivalent are
built from the same random data. Each call is timed twice: as CUDA-graph replays between CUDA events
(bench_timing.py: the kernel's own time, which the ratios and rates use) and eagerly, back-to-back
Python calls (host included; short cases are bound by the host there). FLOPs count the causal
problem only: 4 * head_size * num_heads * (sum over queries of the keys each one sees), i.e. QK^T
and PV, 2 FLOPs per multiply-add. Next to it: the bf16 rate of an 8192^3 torch.matmul measured in
the same run (the card's practical tensor-core ceiling) and torch SDPA with the flash backend on the
dense problem (ratio ours / SDPA). Each case also reports the largest difference between our output
and SDPA's.

    python benchmarks/bench_paged_prefill.py --out prefill.json
    python benchmarks/bench_paged_prefill.py --cases mha_fp16_d128,gqa_fp16_d128 --iters 50
    python benchmarks/bench_paged_prefill.py --variants default,m64,w8   # tilings, fp16 d128
    python benchmarks/bench_paged_prefill.py --variants default,mma,wgmma  # sm_90a
    python benchmarks/bench_paged_prefill.py --variants default,prev,eager,bn32,chunked  # new/prev

A failing case is recorded with its error and the run goes on. ``--variants`` also times other
kernel choices, set through environment variables read at each call (see VARIANTS): the
alternative tilings of the fp16 head-size-96/128 kernels (CACHEFLOW_PREFILL_VARIANT): m64 = 64 query
rows per CTA (4 warps x 16), w8 = 128 rows with 8 warps x 16; default = 128 rows with 4 warps x
32; ``prev`` = the kernel before 2026-12-03 (CACHEFLOW_PREFILL_RESCALE_THRESHOLD=-1: rescale at
every key tile; CACHEFLOW_PREFILL_VARIANT=bn32: head size 256 with 32-key tiles;
CACHEFLOW_PREFILL_GRID=group: group-major CTA order, the default again), ``eager`` and ``bn32``
each of those alone, and ``chunked`` (CACHEFLOW_PREFILL_GRID=chunked: the chunked longest-first
CTA order, measured slower on the H200). ``bn64`` and ``w4``: the tilings before 2026-12-04 of
head size 64 (64-key tiles; now 128) and 256 (64 rows over 4 warps; now 128 over 8).
``wgmma`` and ``wgmma_serial``: the Hopper kernel (compute capability 9.0), with and without its
softmax / P V overlap (the serial one is the default there at head sizes 96, 128 and 256 with
16-bit caches); ``mma``: the mma.sync kernels in those cases.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from bench_timing import time_graph_us

import cacheflow_kernels

# torch is imported in main(): nothing under packages/cacheflow-kernels imports it at module level.
torch: Any = None
F: Any = None


@dataclass
class Case:
    name: str
    q_lens: list[int]
    ctx_lens: list[int]
    num_heads: int = 32
    num_kv_heads: int = 32
    head_size: int = 128
    dtype: str = "float16"
    block_size: int = 16
    window: int | None = None  # sliding window (no SDPA flash equivalent: ours only)


def _uniform(n: int, q: int, ctx: int | None = None) -> tuple[list[int], list[int]]:
    return [q] * n, [ctx or q] * n


CASES = [
    Case("mha_fp16_d128", *_uniform(8, 2048)),
    Case("gqa_fp16_d128", *_uniform(8, 2048), num_kv_heads=8),
    Case("prefix_fp16_d128", *_uniform(8, 1024, 2048)),  # 1024 cached + 1024 new
    Case("mha_bf16_d128", *_uniform(8, 2048), dtype="bfloat16"),
    Case("mha_fp16_d64", *_uniform(8, 2048), head_size=64),
    Case("gqa_fp16_d64", *_uniform(8, 2048), head_size=64, num_kv_heads=8),
    Case("prefix_bf16_d64", *_uniform(8, 1024, 2048), head_size=64, dtype="bfloat16"),
    Case("ragged_fp16_d64", [1800, 37, 1024, 513, 2048, 77, 1500, 900],
         [1800, 37, 1024, 513, 2048, 77, 1500, 900], head_size=64),
    Case("mixed_a_fp16_d64", [1024, 520], [1024, 520], head_size=64),
    Case("long_fp16_d128", *_uniform(2, 8192)),
    Case("block32_fp16_d128", *_uniform(8, 2048), block_size=32),
    Case("block8_fp16_d128", *_uniform(8, 2048), block_size=8),
    Case("chunk_fp16_d128", *_uniform(8, 512, 8192)),  # chunked prefill deep into a context
    Case("ragged_fp16_d128", [1800, 37, 1024, 513, 2048, 77, 1500, 900],
         [1800, 37, 1024, 513, 2048, 77, 1500, 900]),
    Case("mha_fp16_d256", *_uniform(8, 2048), num_heads=16, num_kv_heads=16, head_size=256),
    Case("mha_fp16_d96", *_uniform(8, 2048), head_size=96),
    Case("window1024_fp16_d128", *_uniform(4, 8192), window=1024),
    # The prompt chunks of one mixed step of issue 10's workload (prompts 16..1024 tokens, ~914
    # prompt tokens per step beside the decodes): few CTAs, so the longest tile's chain of key
    # tiles, not the tensor-core rate, sets the time.
    Case("mixed_a_fp16_d128", [1024, 520], [1024, 520]),
    Case("mixed_b_fp16_d128", [700, 300, 150], [700, 300, 150]),
    Case("mixed_c_fp16_d128", [400, 514], [900, 514]),  # a chunk continuing a 900-token prompt
    Case("mixed_a_bf16_d128", [1024, 520], [1024, 520], dtype="bfloat16"),
]


VARIANT_ENV = "CACHEFLOW_PREFILL_VARIANT"
RESCALE_ENV = "CACHEFLOW_PREFILL_RESCALE_THRESHOLD"
GRID_ENV = "CACHEFLOW_PREFILL_GRID"


def _fp16_d96_d128(c: Case) -> bool:
    return c.dtype == "float16" and c.head_size in (96, 128)


def _hopper_head(c: Case) -> bool:
    return c.dtype in ("float16", "bfloat16") and c.head_size in (64, 96, 128, 256)


# name -> (environment of the call, cases it applies to). "prev" is the kernel before 2026-12-03
# (eager rescaling; head size 256 with BN 32 and two K buffers; group-major CTA order; head size
# 64 keeps its current tiling, see "bn64"); "eager"
# and "bn32" switch one of those choices back alone; "chunked" takes the other CTA order.
VARIANTS: dict[str, tuple[dict[str, str], Any]] = {
    "default": ({}, lambda c: True),
    "m64": ({VARIANT_ENV: "m64"}, _fp16_d96_d128),
    "w8": ({VARIANT_ENV: "w8"}, _fp16_d96_d128),
    "prev": ({VARIANT_ENV: "bn32", RESCALE_ENV: "-1", GRID_ENV: "group"}, lambda c: True),
    "eager": ({RESCALE_ENV: "-1"}, lambda c: True),
    "bn32": ({VARIANT_ENV: "bn32"}, lambda c: c.head_size == 256),
    "chunked": ({GRID_ENV: "chunked"}, lambda c: True),
    "bn64": ({VARIANT_ENV: "bn64"}, lambda c: c.head_size == 64),
    "w4": ({VARIANT_ENV: "w4"}, lambda c: c.head_size == 256),
    # The Hopper (wgmma) kernel: compute capability 9.0, head sizes 64 / 96 / 128 / 256; serial:
    # without the softmax / P V overlap.
    "wgmma": ({VARIANT_ENV: "wgmma"}, _hopper_head),
    "wgmma_serial": ({VARIANT_ENV: "wgmma_serial"}, _hopper_head),
    # The mma.sync kernels where the default is the Hopper kernel (head sizes 96 / 128 / 256).
    "mma": ({VARIANT_ENV: "mma"}, lambda c: True),
}


@dataclass
class Result:
    case: dict[str, Any]
    variant: str = "default"
    flops: float = 0.0
    ours_ms: float | None = None
    ours_tflops: float | None = None
    ours_spread_ms: float | None = None
    ours_graph_ms: float | None = None  # CUDA-graph replays: the kernel without the host
    sdpa_ms: float | None = None
    sdpa_tflops: float | None = None
    sdpa_graph_ms: float | None = None
    sdpa_variant: str | None = None
    ratio_vs_sdpa: float | None = None  # graph-replay times
    ratio_vs_sdpa_eager: float | None = None
    max_abs_diff_vs_sdpa: float | None = None
    errors: list[str] = field(default_factory=list)


def time_ms(fn: Any, warmup: int, iters: int) -> tuple[float, float]:
    """Median and interquartile spread of `iters` timed calls (one event pair each)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [times[0], 0, times[-1]]
    return statistics.median(times), q[2] - q[0]


def causal_flops(case: Case) -> float:
    """4 * head_size * heads * (keys seen, summed over queries): causal, window-limited."""
    visible = 0
    for q, c in zip(case.q_lens, case.ctx_lens):
        if case.window is None:
            visible += q * (c - q) + q * (q + 1) // 2
        else:
            visible += sum(min(p + 1, case.window) for p in range(c - q, c))
    return 4.0 * case.head_size * case.num_heads * visible


def matmul_tflops(warmup: int, iters: int) -> float:
    n = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    ms, _ = time_ms(lambda: torch.matmul(a, b), warmup, iters)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def build(case: Case, seed: int) -> dict[str, Any]:
    """The paged inputs and the dense [B, H, S, D] views of the same data (uniform batches)."""
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bs, d = case.block_size, case.head_size
    n = len(case.q_lens)
    blocks_per_seq = [math.ceil(c / bs) for c in case.ctx_lens]
    max_blocks = max(blocks_per_seq)
    num_blocks = sum(blocks_per_seq)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    tables = torch.zeros(n, max_blocks, dtype=torch.int32, device="cuda")
    key_cache = torch.empty(num_blocks, bs, case.num_kv_heads, d, dtype=dtype, device="cuda")
    value_cache = torch.empty_like(key_cache)
    keys, values = [], []
    used = 0
    for i, (nb, ctx) in enumerate(zip(blocks_per_seq, case.ctx_lens)):
        tables[i, :nb] = perm[used:used + nb]
        used += nb
        k = torch.randn(ctx, case.num_kv_heads, d, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn(ctx, case.num_kv_heads, d, device="cuda", dtype=dtype, generator=gen)
        pos = torch.arange(ctx, device="cuda")
        blk = tables[i].long()[pos // bs]
        key_cache[blk, pos % bs] = k
        value_cache[blk, pos % bs] = v
        keys.append(k)
        values.append(v)
    num_tokens = sum(case.q_lens)
    query = torch.randn(num_tokens, case.num_heads, d, device="cuda", dtype=dtype, generator=gen)
    starts = torch.tensor([0] + list(_cumsum(case.q_lens)), dtype=torch.int32, device="cuda")
    inputs = {
        "out": torch.full_like(query, float("nan")),
        "query": query,
        "key_cache": key_cache,
        "value_cache": value_cache,
        "block_tables": tables,
        "query_start_loc": starts,
        "context_lens": torch.tensor(case.ctx_lens, dtype=torch.int32, device="cuda"),
        "keys": keys,
        "values": values,
    }
    return inputs


def _cumsum(xs: list[int]) -> list[int]:
    total, out = 0, []
    for x in xs:
        total += x
        out.append(total)
    return out


def sdpa_runner(case: Case, inputs: dict[str, Any], scale: float) -> tuple[Any, str]:
    """A closure running SDPA (flash backend) on the dense problem, and what it runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if len(set(case.q_lens)) != 1 or len(set(case.ctx_lens)) != 1:
        raise RuntimeError("no dense equivalent for a ragged batch")
    if case.window is not None:
        raise RuntimeError("SDPA's flash backend has no sliding window")
    n, q_len, ctx = len(case.q_lens), case.q_lens[0], case.ctx_lens[0]
    d = case.head_size
    q = inputs["query"].view(n, q_len, case.num_heads, d).transpose(1, 2)
    k = torch.stack(inputs["keys"]).transpose(1, 2)    # [B, Hkv, S, D]
    v = torch.stack(inputs["values"]).transpose(1, 2)
    kwargs: dict[str, Any] = {"scale": scale}
    variant = "flash"
    if q_len == ctx:
        kwargs["is_causal"] = True
    else:
        from torch.nn.attention.bias import causal_lower_right

        kwargs["attn_mask"] = causal_lower_right(q_len, ctx)
        variant += " causal_lower_right"
    if case.num_kv_heads != case.num_heads:
        kwargs["enable_gqa"] = True
        variant += " enable_gqa"

    def run() -> Any:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    try:
        run()
    except Exception:  # noqa: BLE001 - e.g. GQA not in this torch's flash path: expand K/V
        if case.num_kv_heads == case.num_heads:
            raise
        group = case.num_heads // case.num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        kwargs.pop("enable_gqa")
        variant = variant.replace(" enable_gqa", " K/V expanded to MHA")
        run()
    return run, variant


def bench_case(case: Case, args: argparse.Namespace, seed: int, variant: str) -> Result:
    result = Result(case=asdict(case), variant=variant, flops=causal_flops(case))
    _set_env(VARIANTS[variant][0])
    inputs = None
    try:
        inputs = build(case, seed)
        scale = case.head_size ** -0.5
        tensors = [inputs[k] for k in ("out", "query", "key_cache", "value_cache", "block_tables",
                                       "query_start_loc", "context_lens")]
        max_q = max(case.q_lens)

        def ours() -> None:
            cacheflow_kernels.paged_prefill_attention(*tensors, scale, max_q,
                                                      sliding_window=case.window)

        ours()
        torch.cuda.synchronize()
        if torch.isnan(inputs["out"]).any():
            result.errors.append("ours: NaN in the output")
        ms, spread = time_ms(ours, args.warmup, args.iters)
        result.ours_ms, result.ours_spread_ms = ms, spread
        result.ours_graph_ms = time_graph_us(torch, [ours], calls_per_graph=10, replays=10) / 1e3
        result.ours_tflops = result.flops / (result.ours_graph_ms * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 - record and go on
        result.errors.append(f"ours: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
    if inputs is not None and not args.no_sdpa:
        try:
            run, variant = sdpa_runner(case, inputs, case.head_size ** -0.5)
            result.sdpa_variant = variant
            ref = run()
            if result.ours_ms is not None:
                n, q_len = len(case.q_lens), case.q_lens[0]
                ours_dense = inputs["out"].view(n, q_len, case.num_heads, case.head_size)
                diff = (ours_dense.float() - ref.transpose(1, 2).float()).abs().max()
                result.max_abs_diff_vs_sdpa = float(diff)
            ms, _ = time_ms(run, args.warmup, args.iters)
            result.sdpa_ms = ms
            result.sdpa_graph_ms = time_graph_us(torch, [run], calls_per_graph=10,
                                                 replays=10) / 1e3
            result.sdpa_tflops = result.flops / (result.sdpa_graph_ms * 1e-3) / 1e12
            if result.ours_graph_ms is not None:
                result.ratio_vs_sdpa = result.sdpa_graph_ms / result.ours_graph_ms
                result.ratio_vs_sdpa_eager = result.sdpa_ms / result.ours_ms
        except Exception as e:  # noqa: BLE001
            result.errors.append(f"sdpa: {type(e).__name__}: {e}")
    del inputs
    torch.cuda.empty_cache()
    return result


def _set_env(env: dict[str, str]) -> None:
    for name in (VARIANT_ENV, RESCALE_ENV, GRID_ENV):
        os.environ.pop(name, None)
    os.environ.update(env)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    global torch, F
    import torch
    import torch.nn.functional as F

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-sdpa", action="store_true", help="skip the SDPA comparison")
    parser.add_argument("--variants", default="default",
                        help=f"kernel variants to time where they apply: {','.join(VARIANTS)}; "
                             "SDPA runs with the first one, the others' ratios use its time")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    if args.list:
        for c in CASES:
            print(c.name, c)
        return 0
    wanted = [c for c in args.cases.split(",") if c]
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; --list shows them")
    cases = [c for c in CASES if not wanted or c.name in wanted]
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1

    device = torch.cuda.get_device_name()
    header: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "python": platform.python_version(),
        "cacheflow_kernels": cacheflow_kernels.__version__,
    }
    try:
        header["matmul_bf16_tflops"] = matmul_tflops(args.warmup, max(10, args.iters // 2))
    except Exception as e:  # noqa: BLE001
        header["matmul_bf16_tflops"] = None
        header["matmul_error"] = f"{type(e).__name__}: {e}"
    mm = header["matmul_bf16_tflops"]

    variants = [v for v in args.variants.split(",") if v] or ["default"]
    bad = set(variants) - set(VARIANTS)
    if bad:
        parser.error(f"unknown variants {sorted(bad)}")
    results = []
    no_sdpa = args.no_sdpa
    for i, case in enumerate(cases):
        first: Result | None = None
        for variant in [v for v in variants if VARIANTS[v][1](case)]:
            args.no_sdpa = no_sdpa or first is not None
            r = bench_case(case, args, seed=i, variant=variant)
            if first is None:
                first = r
            elif first.sdpa_graph_ms is not None and r.ours_graph_ms is not None:
                r.sdpa_ms, r.sdpa_graph_ms = first.sdpa_ms, first.sdpa_graph_ms
                r.ratio_vs_sdpa = first.sdpa_graph_ms / r.ours_graph_ms
                r.ratio_vs_sdpa_eager = first.sdpa_ms / r.ours_ms
            results.append(r)
            print(f"[{i + 1}/{len(cases)}] {case.name} ({variant}): "
                  f"ours {_fmt(r.ours_graph_ms, '.3f')}"
                  f" ms, sdpa {_fmt(r.sdpa_graph_ms, '.3f')} ms {'; '.join(r.errors)}",
                  file=sys.stderr, flush=True)
    args.no_sdpa = no_sdpa
    _set_env({})

    print(f"\npaged_prefill_attention on {device} (torch {torch.__version__}); "
          f"bf16 matmul 8192^3: {_fmt(mm, '.0f')} TFLOP/s")
    cols = ("case", "ours ms", "eager ms", "ours TF/s", "% matmul", "sdpa ms", "sdpa TF/s",
            "ours/sdpa", "eager ratio", "max|diff|", "notes")
    rows = []
    for r in results:
        c = r.case
        pct = None if (r.ours_tflops is None or not mm) else 100.0 * r.ours_tflops / mm
        name = c["name"] if r.variant == "default" else f"{c['name']} [{r.variant}]"
        rows.append((
            name, _fmt(r.ours_graph_ms, ".3f"), _fmt(r.ours_ms, ".3f"),
            _fmt(r.ours_tflops, ".1f"), _fmt(pct, ".0f"), _fmt(r.sdpa_graph_ms, ".3f"),
            _fmt(r.sdpa_tflops, ".1f"), _fmt(r.ratio_vs_sdpa, ".2f"),
            _fmt(r.ratio_vs_sdpa_eager, ".2f"),
            _fmt(r.max_abs_diff_vs_sdpa, ".1e"),
            "; ".join(r.errors) or (r.sdpa_variant or ""),
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    for row in (cols, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "results": [asdict(r) for r in results]}, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
