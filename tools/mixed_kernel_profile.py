"""Where the device time of issue 10's mixed workload goes, by kernel family.

    python3 tools/mixed_kernel_profile.py CKPT [--start 150 --steps 200]
    # pure decode steps at one batch size instead (prompts of --input-len tokens)
    python3 tools/mixed_kernel_profile.py CKPT --batch 1 --input-len 128 --start 8 --steps 64

Adds the 1,000 synthetic requests of `cacheflow bench throughput` (16..1024 / 16..512, seed 0)
to an engine on the checkpoint, steps it to ``--start``, then records ``--steps`` steps under
torch.profiler (device activity only) and prints the device ms per step of each kernel family
(GEMMs, decode / prefill attention, norms, rotary, cache writes, activation, sampling and
other torch ops, copies), the busy share of the window, the step kinds inside it and the
decode rows' K/V bytes over the decode attention's device time. With programmatic dependent
launch a kernel's span includes its wait for the kernel before it (``CACHEFLOW_PDL=0`` for
spans of its own work only).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

FAMILIES = [
    ("gemm", r"nvjet|gemm|cutlass|sm90_xmma|splitKreduce|cublas"),
    ("decode_attn", r"PagedAttention|paged_attention|MergePartitions|Merge"),
    ("prefill_attn", r"Prefill|prefill"),
    ("norm", r"RmsNorm|rms_norm|Norm"),
    ("rotary", r"Rotary|rotary"),
    ("cache_write", r"ReshapeAndCache|reshape_and_cache|Cache"),
    ("activation", r"SiluAndMul|silu|Gelu|Activation"),
    ("copy", r"Memcpy|Memset|memcpy|memset"),
]


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name):
            return fam
    return "other"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt", type=Path)
    p.add_argument("--start", type=int, default=150)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--batch", type=int, default=0,
                   help="profile decode steps of this many requests instead of the mixed "
                        "workload (0)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens with --batch")
    args = p.parse_args()
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from cacheflow_runtime import SamplingParams
    from cacheflow_serve import LLM
    from cacheflow_serve.bench_common import LengthSpec, prompt_token_ids, synthetic_requests
    from cacheflow_serve.bench_gpu_busy import device_intervals, union_seconds
    from cacheflow_serve.bench_latency import measure_copy_bandwidth
    from cacheflow_serve.bench_step_trace import StepTrace
    from cacheflow_serve.llm import full_gc_paused

    llm = LLM(model=str(args.ckpt), dtype="float16")
    engine = llm.engine
    ids = prompt_token_ids(llm.get_tokenizer(), engine.model_config.vocab_size)
    if args.batch > 0:
        # Outputs outlast the window, so every profiled step decodes the whole batch.
        out_len = str(args.start + args.steps + 8)
        reqs = synthetic_requests(args.batch, LengthSpec.parse(str(args.input_len), "--input-len"),
                                  LengthSpec.parse(out_len, "--output-len"), ids, 0)
    else:
        reqs = synthetic_requests(1000, LengthSpec.parse("16:1024", "--input-len"),
                                  LengthSpec.parse("16:512", "--output-len"), ids, 0)
    for i, r in enumerate(reqs):
        engine.add_request(f"r{i}", None, SamplingParams(temperature=0.0, max_tokens=r.output_len,
                                                         ignore_eos=True, detokenize=False),
                           r.prompt_token_ids)
    for _ in range(args.start):
        engine.step()
    torch.cuda.synchronize()
    tracer = StepTrace(llm, cuda=True)
    # As in LLM.generate: no full collector pass inside the window (a stall of ~0.3 s).
    with full_gc_paused(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
    torch.cuda.synchronize()
    tracer.stop()
    copy_bw = measure_copy_bandwidth(torch.device("cuda"))["bytes_per_s"]
    big = torch.ones(1 << 31, dtype=torch.float16, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    big.amax()
    start.record()
    for _ in range(10):
        big.amax()
    end.record()
    end.synchronize()
    read_bw = 10 * big.numel() * 2 / (start.elapsed_time(end) / 1e3)
    print(f"read-only pass (amax over 4 GiB): {read_bw / 1e9:.0f} GB/s")
    del big
    cfg = engine.model_config.hf_config
    kv_per_token = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads
                    * (cfg.hidden_size // cfg.num_attention_heads) * 2)
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA
              and e.time_range.end > e.time_range.start]
    intervals = device_intervals(prof.events())
    window = max(h for _, h in intervals) - min(lo for lo, _ in intervals)
    busy = union_seconds(intervals)
    fam_us: dict[str, float] = {}
    name_us: dict[str, list[float]] = {}
    for e in events:
        us = e.time_range.end - e.time_range.start
        f = family(e.name)
        fam_us[f] = fam_us.get(f, 0.0) + us
        entry = name_us.setdefault(e.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    n = args.steps
    print(f"{torch.cuda.get_device_name()}: steps {args.start}..{args.start + n}, window "
          f"{window / 1e3:.1f} ms ({window / n / 1e3:.2f} ms/step), busy {busy / window:.1%}")
    total = sum(fam_us.values())
    for f, us in sorted(fam_us.items(), key=lambda kv: -kv[1]):
        print(f"  {f:14s} {us / n / 1e3:8.3f} ms/step  {us / total:6.1%}")
    recs = tracer.records
    rows = max(1, sum(r.decode_rows for r in recs))
    kv_bytes = sum(r.decode_context_tokens for r in recs) * kv_per_token
    attn_s = fam_us.get("decode_attn", 0.0) / 1e6
    print(f"  {len(recs)} steps traced: {sum(r.kind == 'decode' for r in recs)} decode, "
          f"{sum(r.kind == 'mixed' for r in recs)} mixed; mean decode rows "
          f"{sum(r.decode_rows for r in recs) / len(recs):.0f}, prompt tokens "
          f"{sum(r.prompt_tokens for r in recs) / len(recs):.0f}, decode context "
          f"{sum(r.decode_context_tokens for r in recs) / rows:.0f}")
    print(f"  decode K/V {kv_bytes / 1e9:.1f} GB in {attn_s * 1e3:.1f} ms of decode attention: "
          f"{kv_bytes / attn_s / 1e9:.0f} GB/s = {kv_bytes / attn_s / copy_bw:.1%} of copy "
          f"({copy_bw / 1e9:.0f} GB/s)")
    print("top kernels:")
    for name, (us, cnt) in sorted(name_us.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {us / n / 1e3:8.3f} ms/step {cnt / n:7.1f} calls/step  {family(name):12s} "
              f"{name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
