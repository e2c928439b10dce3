"""Bandwidth of the element-wise kernels of cacheflow-kernels against the card's copy bandwidth
and against their plain-torch equivalents, measured in one process on one card.

    python packages/cacheflow-kernels/benchmarks/bench_elementwise.py --out bench.json

For each op at --tokens tokens (default 8192; hidden 4096 for norms and activations, 32 query
heads and 8 KV heads of 128 for rotary) it reports the median GPU time per call (a CUDA graph of
calls replayed between CUDA events, see bench_timing.py; inputs rotated over enough buffer sets
that L2 cannot hold them) and the achieved bandwidth: bytes that must be read plus bytes that
must be written, each once, divided by that time. The eager time per call (back-to-back calls
from Python, host included) is reported next to it. Also: the device-to-device copy bandwidth
measured in the same run (torch clone of a 1 GiB tensor: 1 GiB read + 1 GiB written), the op's
share of it, and the eager time of the torch equivalent (the runtime's torch code for the op).
Each op is first checked against its torch equivalent (max abs difference reported). One op's
failure is reported and the run goes on. Prints a table and writes JSON to --out.

Without torch or a CUDA device the script prints why and exits with status 1 (nothing measured).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench_timing import copy_bandwidth, environment, time_graph_us

TARGET_SHARE_OF_COPY = 0.80
GIB = 1 << 30


@dataclass
class Result:
    op: str
    shape: str
    bytes_moved: int = 0
    time_us: float | None = None  # GPU time (CUDA-graph replay)
    eager_us: float | None = None  # back-to-back Python calls, host included
    gbps: float | None = None
    pct_of_copy: float | None = None
    torch_time_us: float | None = None
    speedup_vs_torch: float | None = None
    max_abs_diff: float | None = None
    buffer_sets: int = 1
    note: str = ""
    error: str | None = None
    torch_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls per op")
    p.add_argument("--batches", type=int, default=40, help="timed batches per op (median taken)")
    p.add_argument("--batch-size", type=int, default=10, help="calls per timed batch")
    p.add_argument("--only", default="", help="comma-separated op names to run (default: all)")
    p.add_argument("--skip-torch", action="store_true", help="do not time the torch equivalents")
    p.add_argument("--compare-alternative", action="store_true",
                   help="also time every alternative kernel of ops that have some (rotary: "
                        "CACHEFLOW_ROTARY=block, warp, pipelined) in the same process, next to "
                        "the default")
    return p.parse_args(argv)


def _short_error(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:500]


class Bench:
    def __init__(self, torch: Any, args: argparse.Namespace) -> None:
        self.torch = torch
        self.args = args
        self.dtype = getattr(torch, args.dtype)
        self.device = torch.device("cuda")
        props = torch.cuda.get_device_properties(self.device)
        self.l2_bytes = int(getattr(props, "L2_cache_size", 50 * (1 << 20)) or 50 * (1 << 20))
        self.copy_gbps: float | None = None

    # ---- timing ----

    def buffer_sets(self, bytes_per_set: int, cap: int = 8) -> int:
        """Enough input sets that together they are >= 4x the L2 size (at least 2)."""
        if bytes_per_set <= 0:
            return 2
        return int(min(cap, max(2, math.ceil(4 * self.l2_bytes / bytes_per_set))))

    def time_us(self, calls: list[Callable[[], Any]]) -> float:
        """Median time per call (us): CUDA events around batches of calls, rotating `calls`."""
        torch = self.torch
        n = len(calls)
        for i in range(self.args.warmup):
            calls[i % n]()
        torch.cuda.synchronize()
        batches, size = self.args.batches, self.args.batch_size
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(batches)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(batches)]
        torch.cuda._sleep(2_000_000)  # let the host queue work ahead of the GPU
        k = 0
        for b in range(batches):
            starts[b].record()
            for _ in range(size):
                calls[k % n]()
                k += 1
            ends[b].record()
        torch.cuda.synchronize()
        per_call = [s.elapsed_time(e) * 1000.0 / size for s, e in zip(starts, ends)]
        return statistics.median(per_call)

    def graph_us(self, calls: list[Callable[[], Any]]) -> float:
        """Median GPU time per call (us), from CUDA-graph replays of the rotating calls."""
        return time_graph_us(self.torch, calls, calls_per_graph=self.args.batch_size * 2,
                             replays=self.args.batches)

    def measure_copy(self) -> dict[str, Any]:
        bytes_moved = 2 * GIB
        rate = copy_bandwidth(self.torch)
        t = bytes_moved / rate * 1e6
        self.copy_gbps = rate / 1e9
        return {"bytes": bytes_moved, "time_us": t, "gbps": self.copy_gbps}

    def run(self, result: Result, make: Callable[[int], tuple[list[Callable[[], Any]],
                                                           list[Callable[[], Any]] | None]],
            check: Callable[[], float] | None, bytes_per_set: int, graph: bool = True) -> Result:
        """`make(n)` -> (kernel calls, torch calls) over n buffer sets. ``graph``: the op's time
        is its CUDA-graph time (else eager: host-link copies)."""
        torch = self.torch
        try:
            if check is not None:
                result.max_abs_diff = float(check())
            ours, theirs = make(self.buffer_sets(bytes_per_set))
            result.buffer_sets = len(ours)
            result.eager_us = self.time_us(ours)
            t = self.graph_us(ours) if graph else result.eager_us
            result.time_us = t
            result.gbps = result.bytes_moved / (t * 1e-6) / 1e9
            if self.copy_gbps:
                result.pct_of_copy = 100.0 * result.gbps / self.copy_gbps
            if theirs is not None and not self.args.skip_torch:
                try:
                    result.torch_time_us = self.time_us(theirs)
                    # eager against eager: both include their host paths
                    result.speedup_vs_torch = result.torch_time_us / result.eager_us
                except Exception as exc:  # noqa: BLE001 - report and go on
                    result.torch_error = _short_error(exc)
        except Exception as exc:  # noqa: BLE001 - report and go on
            result.error = _short_error(exc)
            traceback.print_exc(file=sys.stderr)
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return result


    def alternative(self, result: Result, make: Callable[[int], tuple[list[Callable[[], Any]],
                                                              list[Callable[[], Any]] | None]],
                    bytes_per_set: int, env: dict[str, str],
                    check: Callable[[], float] | None = None) -> dict[str, Any]:
        """Times the op again with `env` set (an alternative kernel); appends
        ``{"env", "time_us", "gbps", "pct_of_copy", "max_abs_diff"}`` (or ``{"env", "error"}``)
        to ``result.extra["alternatives"]`` and returns it."""
        entry: dict[str, Any] = {"env": env}
        try:
            with environment(env):
                if check is not None:
                    entry["max_abs_diff"] = float(check())
                ours, _ = make(self.buffer_sets(bytes_per_set))
                t = self.graph_us(ours)
            entry.update(time_us=t, gbps=result.bytes_moved / (t * 1e-6) / 1e9)
            if self.copy_gbps:
                entry["pct_of_copy"] = 100.0 * entry["gbps"] / self.copy_gbps
        except Exception as exc:  # noqa: BLE001 - report and go on
            entry["error"] = _short_error(exc)
        finally:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        result.extra.setdefault("alternatives", []).append(entry)
        return entry


# ---- the ops ----------------------------------------------------------------------------------

def bench_rms_norm(b: Bench, ck: Any, fused: bool) -> Result:
    torch, T, H, dt, dev = b.torch, b.args.tokens, b.args.hidden, b.dtype, b.device
    e = torch.finfo(dt).bits // 8
    eps = 1e-6
    name = "fused_add_rms_norm" if fused else "rms_norm"
    moved = (4 if fused else 2) * T * H * e + H * e
    res = Result(name, f"x[{T},{H}] {b.args.dtype}", bytes_moved=moved)

    def torch_rms(x: Any, w: Any, residual: Any | None = None) -> Any:
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out = w * h.to(x.dtype)
        return out if residual is None else (out, residual)

    w = (1 + 0.1 * torch.randn(H, device=dev)).to(dt)

    def check() -> float:
        x = torch.randn(T, H, device=dev).to(dt)
        if fused:
            r = torch.randn(T, H, device=dev).to(dt)
            want, want_r = torch_rms(x, w, r)
            ck.fused_add_rms_norm(x, r, w, eps)
            return max((x.float() - want.float()).abs().max().item(),
                       (r.float() - want_r.float()).abs().max().item())
        out = torch.empty_like(x)
        ck.rms_norm(out, x, w, eps)
        return (out.float() - torch_rms(x, w).float()).abs().max().item()

    def make(n: int) -> tuple[list[Callable[[], Any]], list[Callable[[], Any]]]:
        xs = [torch.randn(T, H, device=dev).to(dt) for _ in range(n)]
        if fused:
            rs = [torch.randn(T, H, device=dev).to(dt) for _ in range(n)]
            ours = [lambda x=x, r=r: ck.fused_add_rms_norm(x, r, w, eps) for x, r in zip(xs, rs)]
            theirs = [lambda x=x, r=r: torch_rms(x, w, r) for x, r in zip(xs, rs)]
        else:
            outs = [torch.empty_like(x) for x in xs]
            ours = [lambda o=o, x=x: ck.rms_norm(o, x, w, eps) for o, x in zip(outs, xs)]
            theirs = [lambda x=x: torch_rms(x, w) for x in xs]
        return ours, theirs

    return b.run(res, make, check, moved)


# Every value of CACHEFLOW_ROTARY (csrc/rotary.cu); unset is the default (pipelined where every
# CTA gets two tokens or more, else block).
ROTARY_VARIANTS = ("block", "warp", "pipelined")


def bench_rotary(b: Bench, ck: Any, is_neox: bool) -> Result:
    torch, T, dt, dev = b.torch, b.args.tokens, b.dtype, b.device
    heads, kv_heads, head_size, rot_dim, max_pos = 32, 8, 128, 128, 8192
    e = torch.finfo(dt).bits // 8
    qk = T * (heads + kv_heads) * head_size * e
    moved = 2 * qk + 8 * T + 4 * rot_dim * T  # q,k read+written; positions; one cos/sin row
    res = Result("rotary_embedding " + ("neox" if is_neox else "gptj"),
                 f"q[{T},{heads}x{head_size}] k[{T},{kv_heads}x{head_size}] {b.args.dtype}",
                 bytes_moved=moved)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, device=dev).float() / rot_dim))
    freqs = torch.arange(max_pos, device=dev, dtype=torch.float32)[:, None] * inv_freq[None]
    cos_cache, sin_cache = freqs.cos(), freqs.sin()
    cache = torch.cat((cos_cache, sin_cache), dim=-1).contiguous()

    def apply(x: Any, cos: Any, sin: Any) -> Any:  # the runtime's RotaryEmbedding._apply
        n = x.shape[0]
        x = x.view(n, -1, head_size)
        rot, rest = x[..., :rot_dim], x[..., rot_dim:]
        cos = cos.to(x.dtype)[:, None, :]
        sin = sin.to(x.dtype)[:, None, :]
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((rotated, rest), dim=-1).view(n, -1)

    def torch_rotary(pos: Any, q: Any, k: Any) -> tuple[Any, Any]:
        cos, sin = cos_cache[pos], sin_cache[pos]
        return apply(q, cos, sin), apply(k, cos, sin)

    def inputs() -> tuple[Any, Any, Any]:
        pos = torch.randint(0, max_pos, (T,), device=dev)
        q = torch.randn(T, heads * head_size, device=dev).to(dt)
        k = torch.randn(T, kv_heads * head_size, device=dev).to(dt)
        return pos, q, k

    def check() -> float:
        pos, q, k = inputs()
        want_q, want_k = torch_rotary(pos, q, k)
        ck.rotary_embedding(pos, q, k, cache, head_size, is_neox)
        return max((q.float() - want_q.float()).abs().max().item(),
                   (k.float() - want_k.float()).abs().max().item())

    def make(n: int) -> tuple[list[Callable[[], Any]], list[Callable[[], Any]]]:
        sets = [inputs() for _ in range(n)]
        ours = [lambda s=s: ck.rotary_embedding(s[0], s[1], s[2], cache, head_size, is_neox)
                for s in sets]
        theirs = [lambda s=s: torch_rotary(*s) for s in sets]
        return ours, theirs

    b.run(res, make, check, 2 * qk)
    if b.args.compare_alternative and res.error is None:
        for variant in ROTARY_VARIANTS:
            b.alternative(res, make, 2 * qk, {"CACHEFLOW_ROTARY": variant}, check)
    return res


def bench_and_mul(b: Bench, ck: Any, act: str) -> Result:
    torch, T, d, dt, dev = b.torch, b.args.tokens, b.args.hidden, b.dtype, b.device
    F = torch.nn.functional
    e = torch.finfo(dt).bits // 8
    moved = T * 2 * d * e + T * d * e
    label = "silu_and_mul" if act == "silu" else f"gelu_and_mul ({act.split('_')[1]})"
    res = Result(label, f"x[{T},{2 * d}] -> out[{T},{d}] {b.args.dtype}", bytes_moved=moved)

    def torch_op(x: Any) -> Any:
        gate, up = x.chunk(2, dim=-1)
        if act == "silu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate=act.split("_")[1]) * up

    def ours_op(out: Any, x: Any) -> None:
        if act == "silu":
            ck.silu_and_mul(out, x)
        else:
            ck.gelu_and_mul(out, x, act.split("_")[1])

    def check() -> float:
        x = torch.randn(T, 2 * d, device=dev).to(dt)
        out = torch.empty(T, d, device=dev, dtype=dt)
        ours_op(out, x)
        return (out.float() - torch_op(x).float()).abs().max().item()

    def make(n: int) -> tuple[list[Callable[[], Any]], list[Callable[[], Any]]]:
        xs = [torch.randn(T, 2 * d, device=dev).to(dt) for _ in range(n)]
        outs = [torch.empty(T, d, device=dev, dtype=dt) for _ in range(n)]
        return ([lambda o=o, x=x: ours_op(o, x) for o, x in zip(outs, xs)],
                [lambda x=x: torch_op(x) for x in xs])

    return b.run(res, make, check, moved)


def bench_flat(b: Bench, ck: Any, name: str) -> Result:
    torch, T, H, dt, dev = b.torch, b.args.tokens, b.args.hidden, b.dtype, b.device
    e = torch.finfo(dt).bits // 8
    moved = 2 * T * H * e
    res = Result(name, f"x[{T},{H}] {b.args.dtype}", bytes_moved=moved)

    def torch_op(x: Any) -> Any:  # the runtime's versions, in the input dtype
        if name == "gelu_new":
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                               * (x + 0.044715 * x.pow(3))))
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))

    def check() -> float:
        x = torch.randn(T, H, device=dev).to(dt)
        out = torch.empty_like(x)
        getattr(ck, name)(out, x)
        return (out.float() - torch_op(x.float()).to(dt).float()).abs().max().item()

    def make(n: int) -> tuple[list[Callable[[], Any]], list[Callable[[], Any]]]:
        xs = [torch.randn(T, H, device=dev).to(dt) for _ in range(n)]
        outs = [torch.empty_like(x) for x in xs]
        fn = getattr(ck, name)
        return ([lambda o=o, x=x: fn(o, x) for o, x in zip(outs, xs)],
                [lambda x=x: torch_op(x) for x in xs])

    return b.run(res, make, check, moved)


def bench_copy_blocks(b: Bench, ck: Any) -> Result:
    torch, dt, dev = b.torch, b.dtype, b.device
    layers, num_blocks, block_shape, pairs = 32, 1024, (16, 8, 128), 256
    e = torch.finfo(dt).bits // 8
    block_bytes = math.prod(block_shape) * e
    moved = 2 * 2 * layers * pairs * block_bytes  # K and V; read + written
    res = Result("copy_blocks", f"{layers} layers x K,V [{num_blocks},16,8,128] {b.args.dtype}, "
                 f"{pairs} pairs", bytes_moved=moved)
    keys = [torch.randn(num_blocks, *block_shape, device=dev).to(dt) for _ in range(layers)]
    values = [torch.randn(num_blocks, *block_shape, device=dev).to(dt) for _ in range(layers)]
    perm = torch.randperm(num_blocks, device=dev)
    mapping = torch.stack([perm[:pairs], perm[pairs:2 * pairs]], dim=1).contiguous()
    src, dst = mapping[:, 0].contiguous(), mapping[:, 1].contiguous()

    def torch_op() -> None:
        for c in keys + values:
            c[dst] = c[src]

    def check() -> float:
        want = [c.clone() for c in keys[:2] + values[:2]]
        for c in want:
            c[dst] = c[src]
        ck.copy_blocks(keys, values, mapping)
        got = keys[:2] + values[:2]
        return max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))

    def make(n: int) -> tuple[list[Callable[[], Any]], list[Callable[[], Any]]]:
        return [lambda: ck.copy_blocks(keys, values, mapping)], [torch_op]

    res.note = "moves 1 GiB per call: no buffer rotation needed"
    return b.run(res, make, check, moved)


def bench_swap_blocks(b: Bench, ck: Any, to_cpu: bool) -> Result:
    torch, dt, dev = b.torch, b.dtype, b.device
    num_blocks, block_shape, pairs = 2048, (16, 8, 128), 256
    e = torch.finfo(dt).bits // 8
    block_bytes = math.prod(block_shape) * e
    moved = pairs * block_bytes  # bytes carried over the link once
    label = "swap_blocks gpu->cpu" if to_cpu else "swap_blocks cpu->gpu"
    res = Result(label, f"[{num_blocks},16,8,128] {b.args.dtype}, {pairs} scattered pairs",
                 bytes_moved=moved)
    gpu = torch.randn(num_blocks, *block_shape, device=dev).to(dt)
    cpu = torch.empty(num_blocks, *block_shape, dtype=dt).pin_memory()
    cpu.copy_(gpu.cpu())
    gen = torch.Generator().manual_seed(0)
    mapping = torch.stack([torch.randperm(num_blocks, generator=gen)[:pairs],
                           torch.randperm(num_blocks, generator=gen)[:pairs]], dim=1)
    src_idx, dst_idx = mapping[:, 0], mapping[:, 1]
    src, dst = (gpu, cpu) if to_cpu else (cpu, gpu)
    src_idx_dev = src_idx.to(src.device)
    dst_idx_dev = dst_idx.to(dst.device)

    def torch_op() -> None:
        # non_blocking only towards the GPU: a GPU->CPU copy must finish before the CPU reads it.
        dst.index_copy_(0, dst_idx_dev, src.index_select(0, src_idx_dev).to(
            dst.device, non_blocking=not to_cpu))

    def check() -> float:
        want = dst.clone()
        want[dst_idx] = src.cpu()[src_idx].to(want.device) if to_cpu else src[src_idx].to(
            want.device)
        ck.swap_blocks(src, dst, mapping)
        torch.cuda.synchronize()
        return (dst.float() - want.float()).abs().max().item()

    def make(n: int) -> tuple[list[Callable[[], Any]], list[Callable[[], Any]]]:
        return [lambda: ck.swap_blocks(src, dst, mapping)], [torch_op]

    res.note = "host link: % of device copy bandwidth does not apply"
    out = b.run(res, make, check, moved, graph=False)
    out.pct_of_copy = None
    return out


OPS: dict[str, Callable[[Bench, Any], Result]] = {
    "rms_norm": lambda b, ck: bench_rms_norm(b, ck, fused=False),
    "fused_add_rms_norm": lambda b, ck: bench_rms_norm(b, ck, fused=True),
    "rotary_neox": lambda b, ck: bench_rotary(b, ck, is_neox=True),
    "rotary_gptj": lambda b, ck: bench_rotary(b, ck, is_neox=False),
    "silu_and_mul": lambda b, ck: bench_and_mul(b, ck, "silu"),
    "gelu_and_mul_none": lambda b, ck: bench_and_mul(b, ck, "gelu_none"),
    "gelu_and_mul_tanh": lambda b, ck: bench_and_mul(b, ck, "gelu_tanh"),
    "gelu_new": lambda b, ck: bench_flat(b, ck, "gelu_new"),
    "gelu_fast": lambda b, ck: bench_flat(b, ck, "gelu_fast"),
    "copy_blocks": bench_copy_blocks,
    "swap_blocks_d2h": lambda b, ck: bench_swap_blocks(b, ck, to_cpu=True),
    "swap_blocks_h2d": lambda b, ck: bench_swap_blocks(b, ck, to_cpu=False),
}


def _fmt(v: float | None, width: int, spec: str, suffix: str = "") -> str:
    text = "-" if v is None else format(v, spec) + suffix
    return text.rjust(width)


def print_table(results: list[Result], copy: dict[str, Any], device: str) -> None:
    print(f"\n{device}: device copy (torch clone of 1 GiB) {copy['gbps']:.0f} GB/s "
          f"({copy['time_us']:.0f} us for 2 GiB read+written)\n")
    header = (f"{'op':<26} {'GPU us':>9} {'GB/s':>8} {'% copy':>7} {'eager us':>9} "
              f"{'torch us':>9} "
              f"{'speedup':>8} {'max|diff|':>10}  shape")
    print(header)
    print("-" * len(header))
    target = 100 * TARGET_SHARE_OF_COPY
    for r in results:
        if r.error:
            print(f"{r.op:<26} FAILED: {r.error}")
            continue
        flag = "  <80%" if r.pct_of_copy is not None and r.pct_of_copy < target else ""
        torch_note = f"  [torch failed: {r.torch_error}]" if r.torch_error else ""
        print(f"{r.op:<26} {_fmt(r.time_us, 9, '.1f')} {_fmt(r.gbps, 8, '.0f')} "
              f"{_fmt(r.pct_of_copy, 7, '.1f', '%')} {_fmt(r.eager_us, 9, '.1f')} "
              f"{_fmt(r.torch_time_us, 9, '.1f')} "
              f"{_fmt(r.speedup_vs_torch, 8, '.2f', 'x')} {_fmt(r.max_abs_diff, 10, '.3g')}  "
              f"{r.shape}{flag}{torch_note}")
    for r in results:
        alternatives = r.extra.get("alternatives") or []
        if not alternatives or r.time_us is None:
            continue
        print(f"{r.op:<26} default: {r.time_us:.1f} us, {_fmt(r.pct_of_copy, 0, '.1f', '%')} "
              "copy")
        for alt in alternatives:
            env = " ".join(f"{k}={v}" for k, v in alt["env"].items())
            if alt.get("error"):
                print(f"{'':<26}   {env:<28} FAILED: {alt['error']}")
                continue
            print(f"{'':<26}   {env:<28} {alt['time_us']:7.1f} us "
                  f"{_fmt(alt.get('pct_of_copy'), 7, '.1f', '%')} copy; "
                  f"default/this time {r.time_us / alt['time_us']:.3f}; "
                  f"max|diff| {_fmt(alt.get('max_abs_diff'), 0, '.3g')}")
    print(f"\ntarget: >= {target:.0f}% of the copy bandwidth at 8k tokens (ops marked <80% miss "
          "it; swap_blocks crosses the host link and has no % of copy). GPU us: CUDA-graph "
          "replay (swap_blocks: eager); eager us: back-to-back Python calls, host included; "
          "torch us: the torch equivalent, eager")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_elementwise: torch is not installed; nothing measured.", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("bench_elementwise: no CUDA device visible to torch; this benchmark needs a GPU "
              "(nothing measured, no JSON written).", file=sys.stderr)
        return 1
    import cacheflow_kernels as ck

    if not ck.cuda_available():
        print("bench_elementwise: cacheflow_kernels.cuda_available() is False (library missing "
              f"or not loadable: {ck.library_path()}); nothing measured.", file=sys.stderr)
        return 1

    selected = [s for s in args.only.split(",") if s] or list(OPS)
    unknown = [s for s in selected if s not in OPS]
    if unknown:
        print(f"bench_elementwise: unknown op(s) {unknown}; known: {list(OPS)}", file=sys.stderr)
        return 2

    bench = Bench(torch, args)
    props = torch.cuda.get_device_properties(0)
    device = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, " \
             f"L2 {bench.l2_bytes >> 20} MiB)"
    copy = bench.measure_copy()
    results: list[Result] = []
    for name in selected:
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            results.append(OPS[name](bench, ck))
        except Exception as exc:  # noqa: BLE001 - set-up failure of one op: report and go on
            traceback.print_exc(file=sys.stderr)
            results.append(Result(name, "", error=_short_error(exc)))
        torch.cuda.empty_cache()

    print_table(results, copy, device)
    report = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cacheflow_kernels": ck.__version__,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "timing": {"warmup": args.warmup, "batches": args.batches,
                   "batch_size": args.batch_size, "statistic": "median per-call time",
                   "time_us": "CUDA-graph replay (swap_blocks: eager)"},
        "copy": copy,
        "target_share_of_copy": TARGET_SHARE_OF_COPY,
        "results": [asdict(r) for r in results],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0 if all(r.error is None for r in results) else 3


if __name__ == "__main__":
    sys.exit(main())
