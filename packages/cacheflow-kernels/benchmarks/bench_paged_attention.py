"""Benchmark of paged_attention (decode) against the card's copy bandwidth and torch SDPA.

    python packages/cacheflow-kernels/benchmarks/bench_paged_attention.py --out decode.json
    python .../bench_paged_attention.py --out d.json --cases mha_b64_ctx2k,gqa8_b64_ctx2k
    python .../bench_paged_attention.py --out d.json --partitions 0,256,512,1024
    python .../bench_paged_attention.py --out d.json --l2-prefetch 0,2,4,8
    python .../bench_paged_attention.py --out d.json --compare-register --stages 2,4,8 \
        --partitions '' --l2-prefetch ''
    python .../bench_paged_attention.py --out d.json --compare-previous --compare-register \
        --partitions '' --l2-prefetch ''

Decode attention is memory-bound: the floor is reading K and V of every context token once.
For each case: the median GPU time per call (a CUDA graph of calls replayed between CUDA events,
see bench_timing.py; calls rotate over enough cache sets that L2 cannot hold them) and the eager
time (back-to-back Python calls, host included), the bytes that must move (K/V of
every context token read once + the query read + the output written), the achieved GB/s, and
its share of the device-to-device copy bandwidth measured in the same run (a 1 GiB clone: 1 GiB
read + 1 GiB written). Next to it: torch SDPA on the equivalent dense problem (K/V gathered to
contiguous [batch, kv_heads, ctx, head_size] beforehand; only SDPA is timed), as a ratio. Each
case first checks the kernel against a float64 reference on a few sequences. ``--partitions``
also times fixed split-K partition sizes (0 = no split) next to the automatic plan, to tune it;
``--l2-prefetch`` times L2 prefetch distances (the kernel's CACHEFLOW_PA_L2_PREFETCH_TILES; they
only affect the register kernel). ``--compare-register`` also times every case with the
register kernel (CACHEFLOW_PA_PIPELINE=0) next to the default shared-memory pipeline, in the
same process; ``--stages`` times forced pipeline depths (CACHEFLOW_PA_STAGES) on every case.
``--compare-previous`` also times every case with earlier defaults, in the same process
(``previous`` fields; ``--previous-variants`` picks them): ``previous``, CTAs of 32 query heads
for every group above 16 (CACHEFLOW_PA_ROWS=32, the default from ae5ccc7 to 2026-12-05);
``rows16``, CTAs of 16 for every group (CACHEFLOW_PA_ROWS=16); ``warps4``, CTAs of 4 warps
where small unsplit grids take wide CTAs (CACHEFLOW_PA_WARPS=4, the default before
2026-12-05 19:00); ``dec03``, the first kernel of
2026-12-03 (also one-tile steps, CACHEFLOW_PA_STEP=8, and the one-wave split plan,
CACHEFLOW_PA_SPLIT=fill); and earlier choices alone switched back (``old_step``,
``old_split``, ``eager_rescale``: CACHEFLOW_PA_RESCALE_THRESHOLD=-1).
``--strided-query`` also times every case with the query read in place from a fused QKV
projection output (strided sequence rows, as the runtime passes it) instead of a contiguous one.
Cases ending in ``_fp8`` read an FP8 E4M3 cache (one byte per element; the table gives their
speed-up over the same case with a 16-bit cache; SDPA is not run for them).
A failing case is recorded with its error and the run goes on. Prints a table and writes JSON.
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

from bench_timing import copy_bandwidth, cuda_torch, environment, time_graph_us

GIB = 1 << 30
PREFETCH_ENV = "CACHEFLOW_PA_L2_PREFETCH_TILES"
PIPELINE_ENV = "CACHEFLOW_PA_PIPELINE"
STAGES_ENV = "CACHEFLOW_PA_STAGES"
STEP_ENV = "CACHEFLOW_PA_STEP"
SPLIT_ENV = "CACHEFLOW_PA_SPLIT"
RESCALE_ENV = "CACHEFLOW_PA_RESCALE_THRESHOLD"
ROWS_ENV = "CACHEFLOW_PA_ROWS"
WARPS_ENV = "CACHEFLOW_PA_WARPS"
# --compare-previous: earlier defaults, and earlier choices alone switched back.
PREVIOUS = {
    "previous": {ROWS_ENV: "32"},
    "rows16": {ROWS_ENV: "16"},
    "warps4": {WARPS_ENV: "4"},
    "dec03": {STEP_ENV: "8", SPLIT_ENV: "fill", ROWS_ENV: "16"},
    "old_step": {STEP_ENV: "8"},
    "old_split": {SPLIT_ENV: "fill"},
    "eager_rescale": {RESCALE_ENV: "-1"},
}
TARGETS = {"mha_b64_ctx2k": 0.80, "gqa8_b64_ctx2k": 0.80, "mha_b1_ctx32k": 0.70}


@dataclass
class Case:
    name: str
    batch: int
    ctx: int
    num_heads: int = 32
    num_kv_heads: int = 32
    head_size: int = 128
    dtype: str = "float16"
    block_size: int = 16
    ragged: bool = False  # context lengths uniform in [1, ctx] instead of all ctx
    order: str = "random"  # ragged lengths in drawn order, or sorted "desc" / "asc"
    fp8: bool = False  # an FP8 E4M3 cache (k_scale = v_scale = 1)


CASES = [
    Case("mha_b64_ctx2k", 64, 2048),
    Case("gqa8_b64_ctx2k", 64, 2048, num_kv_heads=4),
    Case("mha_b1_ctx32k", 1, 32768),
    Case("gqa8_b1_ctx32k", 1, 32768, num_kv_heads=4),
    Case("mha_b64_ctx2k_bf16", 64, 2048, dtype="bfloat16"),
    Case("gqa8_b64_ctx2k_bf16", 64, 2048, num_kv_heads=4, dtype="bfloat16"),
    Case("mha_b256_ctx512", 256, 512),
    Case("gqa8_b8_ctx8k", 8, 8192, num_kv_heads=4),
    Case("mqa_b32_ctx4k", 32, 4096, num_kv_heads=1),
    Case("mqa_b1_ctx32k", 1, 32768, num_kv_heads=1),
    Case("mqa_b128_ctx1k", 128, 1024, num_kv_heads=1),
    Case("mqa_b8_ctx8k", 8, 8192, num_kv_heads=1),
    Case("mqa_b256_ctx2k", 256, 2048, num_kv_heads=1),
    # MQA groups that are not a multiple of 32: StarCoder's 48 heads, Falcon-7B's 71 at d64.
    Case("mqa_h48_b32_ctx2k", 32, 2048, num_heads=48, num_kv_heads=1),
    Case("mqa_h71_b16_ctx4k_d64", 16, 4096, num_heads=71, num_kv_heads=1, head_size=64),
    Case("gqa4_b16_ctx4k_d64", 16, 4096, num_heads=32, num_kv_heads=8, head_size=64),
    Case("mha_b16_ctx4k_d256", 16, 4096, num_heads=16, num_kv_heads=16, head_size=256),
    Case("mha_b64_ctx2k_bs8", 64, 2048, block_size=8),
    Case("mha_b64_ctx2k_bs32", 64, 2048, block_size=32),
    Case("gqa8_b64_ragged2k", 64, 2048, num_kv_heads=4, ragged=True),
    # Issue 10's mixed workload: 256 decode rows, contexts spread over 1..1536 tokens, in drawn
    # order or longest first (the order of the grid's sequences).
    Case("mha_b256_ragged1536", 256, 1536, ragged=True),
    Case("mha_b256_ragged1536_desc", 256, 1536, ragged=True, order="desc"),
    Case("mha_b64_ctx2k_fp32", 64, 2048, dtype="float32"),
    Case("mha_b16_ctx8k", 16, 8192),
    Case("mha_b16_ctx8k_fp8", 16, 8192, fp8=True),
    Case("gqa8_b8_ctx8k_fp8", 8, 8192, num_kv_heads=4, fp8=True),
    Case("mha_b1_ctx32k_fp8", 1, 32768, fp8=True),
    Case("gqa8_b1_ctx32k_fp8", 1, 32768, num_kv_heads=4, fp8=True),
    # bfloat16 queries over FP8 caches (bf16 models with kv_cache_dtype="fp8"), next to their
    # 16-bit caches.
    Case("mha_b16_ctx8k_bf16", 16, 8192, dtype="bfloat16"),
    Case("mha_b16_ctx8k_bf16_fp8", 16, 8192, dtype="bfloat16", fp8=True),
    Case("gqa8_b8_ctx8k_bf16", 8, 8192, num_kv_heads=4, dtype="bfloat16"),
    Case("gqa8_b8_ctx8k_bf16_fp8", 8, 8192, num_kv_heads=4, dtype="bfloat16", fp8=True),
]


@dataclass
class Result:
    case: str
    shape: str
    bytes_moved: int = 0
    partition_size: int = 0
    num_partitions: int = 1
    time_us: float | None = None  # GPU time (CUDA-graph replay)
    eager_us: float | None = None  # back-to-back Python calls, host included
    gbps: float | None = None
    pct_of_copy: float | None = None
    target_pct: float | None = None
    sdpa_time_us: float | None = None
    sdpa_note: str = ""
    speedup_vs_sdpa: float | None = None
    max_rel_err: float | None = None
    cache_sets: int = 1
    partitions: dict[str, float] = field(default_factory=dict)  # partition size -> time (us)
    l2_prefetch: dict[str, float] = field(default_factory=dict)  # prefetch tiles -> time (us)
    register_time_us: float | None = None  # the register kernel (CACHEFLOW_PA_PIPELINE=0)
    stages: dict[str, float] = field(default_factory=dict)  # forced pipeline depth -> time (us)
    # --compare-previous: variant (PREVIOUS) -> time (us), and the split each one planned
    previous: dict[str, float] = field(default_factory=dict)
    previous_split: dict[str, str] = field(default_factory=dict)
    strided_query_us: float | None = None  # --strided-query: query rows inside a fused QKV row
    error: str | None = None
    sdpa_error: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls per measurement")
    p.add_argument("--batches", type=int, default=15, help="timed batches (median taken)")
    p.add_argument("--batch-size", type=int, default=5, help="calls per timed batch")
    p.add_argument("--partitions", default="0,256,512,1024,2048",
                   help="fixed partition sizes also timed on the first four cases ('' = none)")
    p.add_argument("--l2-prefetch", default="0,1,2,3,4,6,8,12",
                   help="L2 prefetch distances (tiles) timed for the first four cases")
    p.add_argument("--skip-sdpa", action="store_true")
    p.add_argument("--compare-register", action="store_true",
                   help=f"also time the register kernel ({PIPELINE_ENV}=0) on every case")
    p.add_argument("--stages", default="",
                   help=f"forced pipeline depths ({STAGES_ENV}) timed on every case ('' = none)")
    p.add_argument("--compare-previous", action="store_true",
                   help="also time earlier defaults and choices switched back "
                        f"({', '.join(PREVIOUS)}) on every case")
    p.add_argument("--previous-variants", default=",".join(PREVIOUS),
                   help="which --compare-previous variants to time (comma-separated)")
    p.add_argument("--strided-query", action="store_true",
                   help="also time every case with the query as a view into a fused QKV output")
    return p.parse_args(argv)


def _short_error(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]


class Bench:
    def __init__(self, torch: Any, args: argparse.Namespace) -> None:
        self.torch = torch
        self.args = args
        props = torch.cuda.get_device_properties(0)
        self.device_name = props.name
        self.num_sms = props.multi_processor_count
        self.l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
        self.copy_gbps: float | None = None

    def time_calls(self, fns: list[Any]) -> float:
        """Median microseconds per call; call i runs fns[i % len(fns)]."""
        torch = self.torch
        args = self.args
        for i in range(args.warmup):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
        times = []
        k = 0
        for _ in range(args.batches):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.batch_size):
                fns[k % len(fns)]()
                k += 1
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / args.batch_size)
        return statistics.median(times)

    def graph_us(self, fns: list[Any]) -> float:
        """Median GPU microseconds per call, from CUDA-graph replays of the rotating calls."""
        return time_graph_us(self.torch, fns, calls_per_graph=4 * self.args.batch_size,
                             replays=self.args.batches)

    def measure_copy(self) -> float:
        self.copy_gbps = copy_bandwidth(self.torch) / 1e9
        return self.copy_gbps

    def build(self, case: Case, seed: int, lens: list[int]) -> dict[str, Any]:
        """Random caches (every slot filled), shuffled block tables, random query."""
        torch = self.torch
        dtype = getattr(torch, case.dtype)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        blocks = [math.ceil(n / case.block_size) for n in lens]
        max_blocks = max(blocks)
        num_blocks = sum(blocks) + 1
        perm = torch.randperm(num_blocks, generator=gen, device="cuda")
        tables = torch.full((case.batch, max_blocks), int(perm[-1]), dtype=torch.int32)
        owned = perm[:-1].cpu().to(torch.int32)
        offset = 0
        for s, n in enumerate(blocks):
            tables[s, :n] = owned[offset:offset + n]
            offset += n
        shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_size)
        key_cache = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
        value_cache = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
        if case.fp8:
            key_cache = key_cache.to(torch.float8_e4m3fn)
            value_cache = value_cache.to(torch.float8_e4m3fn)
        query = torch.randn((case.batch, case.num_heads, case.head_size), generator=gen,
                            device="cuda", dtype=dtype)
        return {
            "out": torch.empty_like(query), "query": query, "key_cache": key_cache,
            "value_cache": value_cache, "block_tables": tables.cuda(),
            "context_lens": torch.tensor(lens, dtype=torch.int32, device="cuda"),
        }

    def fused_qkv_view(self, case: Case, query: Any) -> Any:
        """``query``'s values in the first columns of a fused [batch, (heads + 2 * kv_heads) *
        head_size] QKV output: the strided view the runtime hands the kernel."""
        width = (case.num_heads + 2 * case.num_kv_heads) * case.head_size
        fused = self.torch.empty((case.batch, width), dtype=query.dtype, device="cuda")
        view = fused[:, : case.num_heads * case.head_size].view(query.shape)
        view.copy_(query)
        return view

    def check(self, case: Case, s: dict[str, Any], lens: list[int]) -> float:
        """Max relative error (norm) vs float64 over up to 3 sequences."""
        torch = self.torch
        import cacheflow_kernels as ck

        ck.paged_attention(s["out"], s["query"], s["key_cache"], s["value_cache"],
                           s["block_tables"], s["context_lens"], case.head_size ** -0.5,
                           max_context_len=case.ctx)
        group = case.num_heads // case.num_kv_heads
        worst = 0.0
        for i in range(min(3, case.batch)):
            pos = torch.arange(lens[i], device="cuda")
            blk = s["block_tables"][i].long()[pos // case.block_size]
            kc, vc = s["key_cache"], s["value_cache"]
            if case.fp8:  # gather the bytes (float8 indexing is not everywhere), then widen
                kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)
            k = kc[blk, pos % case.block_size]
            v = vc[blk, pos % case.block_size]
            if case.fp8:
                k, v = k.view(torch.float8_e4m3fn), v.view(torch.float8_e4m3fn)
            k = k.double().repeat_interleave(group, 1)
            v = v.double().repeat_interleave(group, 1)
            p = (torch.einsum("hd,lhd->hl", s["query"][i].double(), k)
                 * case.head_size ** -0.5).softmax(-1)
            ref = torch.einsum("hl,lhd->hd", p, v)
            err = float((s["out"][i].double() - ref).norm() / ref.norm())
            worst = max(worst, err if math.isfinite(err) else math.inf)
        return worst

    def run_case(self, case: Case, sweep: list[int], prefetch: list[int]) -> Result:
        torch = self.torch
        import cacheflow_kernels as ck
        from cacheflow_kernels._attention_ops import plan_partitions

        res = Result(case.name, f"b{case.batch} ctx{case.ctx} h{case.num_heads}/"
                     f"kv{case.num_kv_heads} d{case.head_size} {case.dtype} bs{case.block_size}"
                     f"{' ragged' if case.ragged else ''}", target_pct=TARGETS.get(case.name))
        sets: list[dict[str, Any]] = []
        dense: list[tuple[Any, Any, Any]] = []
        try:
            gen = torch.Generator().manual_seed(1)
            lens = ([int(x) for x in torch.randint(1, case.ctx + 1, (case.batch,),
                                                   generator=gen)]
                    if case.ragged else [case.ctx] * case.batch)
            if case.order != "random":
                lens.sort(reverse=case.order == "desc")
            elem = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
            kv_elem = 1 if case.fp8 else elem
            kv_bytes = 2 * sum(lens) * case.num_kv_heads * case.head_size * kv_elem
            qo_bytes = 2 * case.batch * case.num_heads * case.head_size * elem
            res.bytes_moved = kv_bytes + qo_bytes
            # Enough cache sets that consecutive calls cannot hit L2 (at most ~24 GiB in all).
            n_sets = max(1, min(8, math.ceil(3 * self.l2_bytes / kv_bytes),
                                (24 * GIB) // max(kv_bytes, 1)))
            res.cache_sets = n_sets
            sets = [self.build(case, seed, lens) for seed in range(n_sets)]
            res.max_rel_err = self.check(case, sets[0], lens)
            size, parts = plan_partitions(case.batch, case.num_heads, case.num_kv_heads,
                                          case.ctx, self.num_sms, head_size=case.head_size)
            res.partition_size, res.num_partitions = size, parts
            scale = case.head_size ** -0.5

            def caller(s: dict[str, Any], partition: int | None) -> Any:
                ws_n = ck.paged_attention_workspace_size(
                    case.batch, case.num_heads, case.num_kv_heads, case.head_size, case.ctx,
                    num_sms=self.num_sms, partition_size=partition)
                ws = torch.empty(max(ws_n, 1), dtype=torch.float32, device="cuda")
                return lambda: ck.paged_attention(
                    s["out"], s["query"], s["key_cache"], s["value_cache"], s["block_tables"],
                    s["context_lens"], scale, max_context_len=case.ctx, workspace=ws,
                    partition_size=partition)

            def with_env(env: dict[str, str], fn: Any) -> Any:
                with environment(env):
                    return fn()

            auto = [caller(s, None) for s in sets]
            res.eager_us = self.time_calls(auto)
            res.time_us = self.graph_us(auto)
            res.gbps = res.bytes_moved / (res.time_us * 1e-6) / 1e9
            if self.copy_gbps:
                res.pct_of_copy = res.gbps / self.copy_gbps
            for partition in sweep:
                try:
                    us = self.graph_us([caller(s, partition) for s in sets])
                    res.partitions[str(partition)] = round(us, 2)
                except Exception as exc:  # noqa: BLE001
                    res.partitions[str(partition)] = float("nan")
                    print(f"  {case.name} partition {partition}: {_short_error(exc)}",
                          file=sys.stderr)
            for tiles in prefetch:
                os.environ[PREFETCH_ENV] = str(tiles)
                try:
                    res.l2_prefetch[str(tiles)] = round(self.graph_us(auto), 2)
                finally:
                    os.environ.pop(PREFETCH_ENV, None)
            if self.args.compare_register:
                os.environ[PIPELINE_ENV] = "0"
                try:
                    res.register_time_us = self.graph_us(auto)
                finally:
                    os.environ.pop(PIPELINE_ENV, None)
            if self.args.compare_previous:
                wanted = [v for v in self.args.previous_variants.split(",") if v]
                for name in wanted:
                    env = PREVIOUS[name]

                    def run_variant(sets: list[dict[str, Any]] = sets) -> tuple[float, str]:
                        # Callers built under the variant's environment: its own split plan and
                        # workspace; the kernel reads its switches at every launch.
                        fns = [caller(s, None) for s in sets]
                        vs, vp = plan_partitions(case.batch, case.num_heads,
                                                 case.num_kv_heads, case.ctx, self.num_sms,
                                                 head_size=case.head_size)
                        return self.graph_us(fns), f"{vp}x{vs}" if vp > 1 else "none"

                    try:
                        us, split = with_env(env, run_variant)
                        res.previous[name] = round(us, 2)
                        res.previous_split[name] = split
                    except Exception as exc:  # noqa: BLE001
                        res.previous[name] = float("nan")
                        print(f"  {case.name} {name}: {_short_error(exc)}", file=sys.stderr)
            if self.args.strided_query:
                strided = [dict(s, query=self.fused_qkv_view(case, s["query"])) for s in sets]
                res.strided_query_us = round(self.graph_us([caller(s, None) for s in strided]), 2)
            for depth in [int(x) for x in self.args.stages.split(",") if x.strip()]:
                os.environ[STAGES_ENV] = str(depth)
                try:
                    res.stages[str(depth)] = round(self.graph_us(auto), 2)
                finally:
                    os.environ.pop(STAGES_ENV, None)
        except Exception as exc:  # noqa: BLE001 - one case's failure must not stop the run
            res.error = _short_error(exc)
            traceback.print_exc()
        if res.error is None and not self.args.skip_sdpa and not case.ragged and not case.fp8:
            try:
                res.sdpa_time_us, res.sdpa_note = self.time_sdpa(case, sets, dense)
                if res.time_us:
                    res.speedup_vs_sdpa = res.sdpa_time_us / res.time_us
            except Exception as exc:  # noqa: BLE001
                res.sdpa_error = _short_error(exc)
        del sets, dense
        torch.cuda.empty_cache()
        return res

    def time_sdpa(self, case: Case, sets: list[dict[str, Any]],
                  dense: list[tuple[Any, Any, Any]]) -> tuple[float, str]:
        """SDPA on contiguous K/V [batch, kv_heads, ctx, d] (gathered before timing)."""
        torch = self.torch
        F = torch.nn.functional
        pos = torch.arange(case.ctx, device="cuda")
        for s in sets:
            blk = s["block_tables"].long()[:, pos // case.block_size]  # [batch, ctx]
            k = s["key_cache"][blk, pos % case.block_size].permute(0, 2, 1, 3).contiguous()
            v = s["value_cache"][blk, pos % case.block_size].permute(0, 2, 1, 3).contiguous()
            dense.append((s["query"].unsqueeze(2), k, v))  # q: [batch, heads, 1, d]
        scale = case.head_size ** -0.5
        note = "enable_gqa" if case.num_heads != case.num_kv_heads else "mha"
        try:
            fns = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k, v, scale=scale, enable_gqa=case.num_heads != case.num_kv_heads)
                for q, k, v in dense]
            return self.graph_us(fns), note
        except (TypeError, RuntimeError):
            # Older torch or no GQA kernel: expand K/V to all heads first (not timed).
            group = case.num_heads // case.num_kv_heads
            expanded = [(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
                        for q, k, v in dense]
            fns = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale)
                   for q, k, v in expanded]
            return self.graph_us(fns), "K/V expanded to all heads"


def print_table(bench: Bench, results: list[Result]) -> None:
    print(f"\ndevice: {bench.device_name} ({bench.num_sms} SMs), copy bandwidth "
          f"{bench.copy_gbps:.0f} GB/s (read + write)")
    head = (f"{'case':<22} {'shape':<44} {'split':>10} {'GPU us':>9} {'eager':>7} {'GB/s':>7} "
            f"{'%copy':>6} {'target':>6} {'SDPA us':>9} {'x SDPA':>7} {'relerr':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        if r.error:
            print(f"{r.case:<22} {r.shape:<44} ERROR {r.error}")
            continue
        split = f"{r.num_partitions}x{r.partition_size}" if r.num_partitions > 1 else "none"
        target = f"{r.target_pct:.0%}" if r.target_pct else ""
        sdpa = f"{r.sdpa_time_us:9.1f}" if r.sdpa_time_us else f"{'-':>9}"
        ratio = f"{r.speedup_vs_sdpa:7.2f}" if r.speedup_vs_sdpa else f"{'-':>7}"
        pct = f"{r.pct_of_copy:6.1%}" if r.pct_of_copy is not None else f"{'-':>6}"
        print(f"{r.case:<22} {r.shape:<44} {split:>10} {r.time_us:9.1f} {r.eager_us:7.1f} "
              f"{r.gbps:7.0f} "
              f"{pct} {target:>6} {sdpa} {ratio} {r.max_rel_err:8.1e}")
    times = {r.case: r.time_us for r in results if r.time_us}
    fp8 = [r for r in results if r.case.endswith("_fp8") and r.time_us
           and times.get(r.case[:-len("_fp8")])]
    if fp8:
        print("\nFP8 cache against the 16-bit cache of the same case (x faster):")
        for r in fp8:
            base = times[r.case[:-len("_fp8")]]
            print(f"  {r.case:<22} {base:.1f} us -> {r.time_us:.1f} us: {base / r.time_us:.2f}x")
    sweeps = [r for r in results if r.partitions]
    if sweeps:
        print("\nfixed partition sizes (us per call; 0 = no split):")
        for r in sweeps:
            cells = "  ".join(f"{k}: {v}" for k, v in r.partitions.items())
            print(f"  {r.case:<22} auto {r.time_us:.1f}  {cells}")
    registers = [r for r in results if r.register_time_us]
    if registers:
        print(f"\nregister kernel ({PIPELINE_ENV}=0) against the pipelined default (us per call):")
        for r in registers:
            print(f"  {r.case:<22} register {r.register_time_us:.1f}  pipeline {r.time_us:.1f}: "
                  f"{r.register_time_us / r.time_us:.2f}x")
    prev = [r for r in results if r.previous]
    if prev:
        print("\nagainst earlier defaults (us per call; x = that time / the default's; "
              f"previous = {ROWS_ENV}=32, rows16 = {ROWS_ENV}=16, warps4 = {WARPS_ENV}=4, "
              f"dec03 = {ROWS_ENV}=16 {STEP_ENV}=8 {SPLIT_ENV}=fill):")
        for r in prev:
            cells = "  ".join(f"{k} {v} ({v / r.time_us:.2f}x, {r.previous_split.get(k, '')})"
                              for k, v in r.previous.items())
            print(f"  {r.case:<22} default {r.time_us:.1f}  {cells}")
    strided = [r for r in results if r.strided_query_us]
    if strided:
        print("\nquery rows inside a fused QKV output (us per call; x = that / contiguous):")
        for r in strided:
            print(f"  {r.case:<22} contiguous {r.time_us:.1f}  strided {r.strided_query_us:.1f} "
                  f"({r.strided_query_us / r.time_us:.2f}x)")
    depths = [r for r in results if r.stages]
    if depths:
        print(f"\nforced pipeline depth ({STAGES_ENV}; us per call, automatic split):")
        for r in depths:
            cells = "  ".join(f"{k}: {v}" for k, v in r.stages.items())
            print(f"  {r.case:<22} auto {r.time_us:.1f}  {cells}")
    prefetches = [r for r in results if r.l2_prefetch]
    if prefetches:
        print(f"\nL2 prefetch distance in tiles ({PREFETCH_ENV}; us per call, automatic split):")
        for r in prefetches:
            cells = "  ".join(f"{k}: {v}" for k, v in r.l2_prefetch.items())
            print(f"  {r.case:<22} {cells}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch = cuda_torch()
    if torch is None:
        return 1
    import cacheflow_kernels as ck

    bench = Bench(torch, args)
    wanted = [c for c in args.cases.split(",") if c]
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        print(f"unknown cases: {sorted(unknown)}", file=sys.stderr)
        return 2
    cases = [c for c in CASES if not wanted or c.name in wanted]
    sweep = [int(x) for x in args.partitions.split(",") if x.strip()]
    prefetch = [int(x) for x in args.l2_prefetch.split(",") if x.strip()]
    bench.measure_copy()
    results = []
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
        first = i < 4 or bool(wanted)
        results.append(bench.run_case(case, sweep if first else [], prefetch if first else []))
    print_table(bench, results)
    report = {
        "device": bench.device_name, "num_sms": bench.num_sms, "l2_bytes": bench.l2_bytes,
        "copy_gbps": bench.copy_gbps, "torch": torch.__version__,
        "cacheflow_kernels": ck.__version__, "python": platform.python_version(),
        "timing": {"warmup": args.warmup, "batches": args.batches,
                   "batch_size": args.batch_size, "statistic": "median of batch means",
                   "time_us": "CUDA-graph replay", "eager_us": "back-to-back Python calls"},
        "results": [asdict(r) for r in results],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


def run_sweep(out: str, names: list[str], partitions: str = "") -> dict[str, Any] | None:
    """Runs :func:`main` on the cases ``names`` (automatic plan, the fixed ``partitions``, no
    SDPA) writing ``out``, and returns that report; None when the run failed. For the scripts
    that add their own cases and append an analysis to the report (:func:`save_report`)."""
    if main(["--out", out, "--cases", ",".join(names), "--partitions", partitions,
             "--l2-prefetch", "", "--skip-sdpa"]):
        return None
    with open(out) as f:
        return json.load(f)


def save_report(out: str, report: dict[str, Any]) -> None:
    """Writes a report of :func:`run_sweep`, with what the caller appended, back to ``out``."""
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
