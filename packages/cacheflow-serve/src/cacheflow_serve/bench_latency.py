"""``cacheflow bench latency``: the decode step and the prefill of ``LLM.generate`` at several
batch sizes, next to the floors the card allows, all measured in the same process.

For each batch size B (``--batch-sizes``), B prompts of ``--input-len`` tokens are generated
with ``max_tokens=1`` and with ``max_tokens=N`` (``--output-len``), ``--num-iters`` times each
(fresh prompts every time, so no cache can serve them) after ``--num-iters-warmup`` untimed
runs. Before the first batch size, one untimed call (one prompt, two tokens) pays the engine's
one-time costs (first forward, lazy initialization), whatever ``--num-iters-warmup`` says, so
that they never land in a timed run. The medians give:

- prefill: ``t(1)``, the time to the first token of all B requests;
- decode step: ``(t(N) - t(1)) / (N - 1)``; this carries the ramp (prompts prefilled in chunks
  while the first sequences already decode, in steps run without CUDA graphs) and the end of
  the run, so the engine's row also gives
- steady decode step: the median wall time between consecutive engine steps in the middle
  half of the steps of the N-token runs (every sequence decoding, context ``input_len + N/4``
  to ``input_len + 3N/4``; the median of the per-run medians).

Floors, from two measurements taken first in the same process:

- memory: ``(parameter bytes + B x context x KV bytes per token) / copy bandwidth``, where the
  bandwidth is a large device-to-device copy (bytes read + written per second) and the context
  is the mean over the decode, ``input_len + N / 2``;
- matmul: ``2 x parameters x B`` FLOPs at the rate of a large matmul (bfloat16 on a GPU, float32
  on the CPU), and ``2 x parameters x B x input_len`` for the prefill.

The step time is reported as a ratio to each floor and to the larger of the two.

On a GPU, the share of a decode step the GPU sits idle (waiting for the host) is measured per
batch size after the timed runs: ``--gpu-busy-steps`` pure decode steps under the profiler,
device activity only (see bench_gpu_busy.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from cacheflow_serve.bench_common import (
    LengthSpec,
    add_model_arguments,
    check_model_arguments,
    describe_model,
    positive_int,
)

if TYPE_CHECKING:
    import torch

DEFAULT_BATCH_SIZES = "1,16,64,256"
# Sizes of the floor measurements: large enough to reach the card's peak, small on the CPU.
_COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
_MATMUL_DIM = {"cuda": 8192, "cpu": 512}
_MEASURE_ITERS = 10


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cacheflow bench latency``."""
    parser.add_argument("--input-len", default="128", help="prompt tokens (one fixed N)")
    parser.add_argument("--output-len", default="128",
                        help="generated tokens N >= 2 (one fixed N)")
    parser.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES,
                        help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--num-iters", type=int, default=3,
                        help="timed runs per batch size and length (median)")
    parser.add_argument("--num-iters-warmup", type=int, default=1,
                        help="untimed runs per batch size first")
    parser.add_argument("--gpu-busy-steps", type=int, default=32,
                        help="decode steps profiled per batch size for the GPU's idle share "
                             "(CUDA only; 0: not measured)")
    add_model_arguments(parser)


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,16,64"`` -> [1, 16, 64] (ValueError naming --batch-sizes otherwise)."""
    try:
        sizes = [int(part) for part in str(text).split(",")]  # an empty entry is an error too
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated positive integers, "
                         f"got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be comma-separated positive integers, got {text!r}")
    return sorted(set(sizes))


def check_latency_arguments(args: argparse.Namespace) -> tuple[int, int, list[int]]:
    """Checks every option before anything loads: (input_len, output_len, batch sizes)."""
    input_len = LengthSpec.parse(args.input_len, "--input-len")
    output_len = LengthSpec.parse(args.output_len, "--output-len")
    for flag, spec in (("--input-len", input_len), ("--output-len", output_len)):
        if not spec.fixed:
            raise ValueError(f"{flag} must be one fixed length for latency, got {spec}")
    if output_len.low < 2:
        raise ValueError(f"--output-len must be at least 2 to time decode steps, "
                         f"got {output_len.low}")
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    positive_int("--num-iters", args.num_iters)
    if args.num_iters_warmup < 0:
        raise ValueError(f"--num-iters-warmup must be >= 0, got {args.num_iters_warmup}")
    if args.gpu_busy_steps < 0:
        raise ValueError(f"--gpu-busy-steps must be >= 0, got {args.gpu_busy_steps}")
    check_model_arguments(args)
    if args.max_num_seqs is not None and args.max_num_seqs < batch_sizes[-1]:
        raise ValueError(f"--max-num-seqs ({args.max_num_seqs}) is below the largest batch "
                         f"size ({batch_sizes[-1]}): that batch would not run as one")
    return input_len.low, output_len.low, batch_sizes


def _timed(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, the wall clock on the CPU)."""
    import torch

    from cacheflow_serve.bench_common import synchronize

    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy_bandwidth(device: torch.device) -> dict[str, Any]:
    """Device-to-device copy bandwidth: bytes read + written per second of a large copy."""
    import torch

    nbytes = _COPY_BYTES[device.type]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, _MEASURE_ITERS)
    return {"bytes_per_s": 2 * nbytes / seconds, "copy_bytes": nbytes}


def measure_matmul_rate(device: torch.device) -> dict[str, Any]:
    """FLOP/s of a large square matmul (bfloat16 on a GPU, float32 on the CPU)."""
    import torch

    dim = _MATMUL_DIM[device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(dim, dim, device=device).to(dtype)
    b = torch.randn(dim, dim, device=device).to(dtype)
    seconds = _timed(lambda: a @ b, device, _MEASURE_ITERS)
    return {"flops_per_s": 2 * dim ** 3 / seconds, "matmul_dim": dim,
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def floors(summary: dict[str, Any], batch: int, input_len: int, output_len: int,
           bandwidth: float, flops: float) -> dict[str, float]:
    """The memory and matmul floors (seconds) of a decode step and of the prefill at ``batch``."""
    context = input_len + output_len / 2
    kv_bytes = batch * context * summary["kv_bytes_per_token"]
    return {"kv_bytes": kv_bytes,
            "memory_floor_s": (summary["parameter_bytes"] + kv_bytes) / bandwidth,
            "matmul_floor_s": 2 * summary["parameters"] * batch / flops,
            "prefill_matmul_floor_s": 2 * summary["parameters"] * batch * input_len / flops}


class StepClock:
    """The wall-clock time at which each engine step returns (wraps ``engine.step``)."""

    def __init__(self, engine: Any) -> None:
        self.times: list[float] = []
        inner = engine.step

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            self.times.append(time.perf_counter())
            return out
        engine.step = timed_step

    def steady_step_s(self) -> Optional[float]:
        """The median interval between the steps of the middle half of the steps recorded
        since the last ``times.clear()`` (None with fewer than 8 steps)."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        if len(gaps) < 8:
            return None
        return statistics.median(gaps[len(gaps) // 4: 3 * len(gaps) // 4])


class _Runner:
    """Timed ``generate`` calls of one engine (or HF) on fresh prompts."""

    def __init__(self, generate: Callable[[list[list[int]], int], list[int]],
                 token_ids: list[int], input_len: int, seed: int, device: torch.device,
                 clock: Optional[StepClock] = None) -> None:
        self.generate = generate
        self.clock = clock
        self.token_ids = token_ids
        self.input_len = input_len
        self.device = device
        # Each call draws fresh prompts (no cache can serve a repeat); the engine and HF
        # runners make the same calls in the same order, so they see the same prompts.
        self.rng = random.Random(seed)

    def prompts(self, batch: int) -> list[list[int]]:
        """``batch`` fresh prompts of ``input_len`` tokens."""
        return [self.rng.choices(self.token_ids, k=self.input_len) for _ in range(batch)]

    def run(self, batch: int, max_tokens: int) -> float:
        """Seconds of one call on ``batch`` fresh prompts; checks every output's length."""
        from cacheflow_serve.bench_common import synchronize

        prompts = self.prompts(batch)
        synchronize(self.device)
        if self.clock is not None:
            self.clock.times.clear()
        start = time.perf_counter()
        lengths = self.generate(prompts, max_tokens)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        if lengths != [max_tokens] * batch:
            raise RuntimeError(f"asked for {max_tokens} tokens per request, got {lengths}")
        return seconds

    def warm_up(self) -> None:
        """One untimed call (one prompt, two tokens): the one-time costs of the first call."""
        self.run(1, 2)

    def measure(self, batch: int, output_len: int, iters: int, warmup: int) -> dict[str, Any]:
        """Median prefill and decode-step seconds at ``batch``."""
        for _ in range(warmup):
            self.run(batch, output_len)
        first, full, steady = [], [], []
        for _ in range(iters):
            first.append(self.run(batch, 1))
            full.append(self.run(batch, output_len))
            step = self.clock.steady_step_s() if self.clock is not None else None
            if step is not None:
                steady.append(step)
        t1, tn = statistics.median(first), statistics.median(full)
        row = {"batch_size": batch, "prefill_s": t1, "generate_s": tn,
               "decode_step_s": (tn - t1) / (output_len - 1),
               "output_tokens_per_run": batch * output_len}
        if steady:
            row["decode_step_steady_s"] = statistics.median(steady)
        return row


def _engine_generate(llm: Any, detokenize: bool) -> Callable[[list[list[int]], int], list[int]]:
    from cacheflow_runtime import SamplingParams

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=detokenize)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]
    return generate


def _hf_generate(hf: Any) -> Callable[[list[list[int]], int], list[int]]:
    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        return [len(row) for row in hf.generate(prompts, max_tokens)]
    return generate


def _sweep(runner: _Runner, batch_sizes: list[int], output_len: int, args: argparse.Namespace,
           desc: str) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    runner.warm_up()
    return [runner.measure(b, output_len, args.num_iters, args.num_iters_warmup)
            for b in tqdm(batch_sizes, desc=desc, unit="batch size", disable=args.disable_tqdm)]


def format_table(report: dict[str, Any]) -> str:
    """The latency report as a plain-text table (milliseconds)."""
    work, dev = report["workload"], report["device_measurements"]
    lines = [f"{describe_model(report)}; input {work['input_len']}, output {work['output_len']} "
             "tokens",
             f"copy bandwidth {dev['bytes_per_s'] / 1e9:.0f} GB/s, {dev['matmul_dtype']} matmul "
             f"{dev['flops_per_s'] / 1e12:.3g} TFLOP/s (this run)",
             "ms per decode step and prefill; floors measured in this run"]
    header = ["batch", "step ms", "mem floor", "step/mem", "mm floor", "step/mm", "step/max",
              "steady ms", "steady/max", "GPU idle", "prefill ms", "prefill/mm"]
    hf = {r["batch_size"]: r for r in report["results"].get("hf", [])}
    if hf:
        header += ["HF step ms", "HF/engine"]
    rows = []
    for r in report["results"]["engine"]:
        row = [str(r["batch_size"]), f"{r['decode_step_s'] * 1e3:.3f}",
               f"{r['memory_floor_s'] * 1e3:.3f}", f"{r['step_over_memory_floor']:.2f}",
               f"{r['matmul_floor_s'] * 1e3:.3f}", f"{r['step_over_matmul_floor']:.2f}",
               f"{r['step_over_max_floor']:.2f}",
               f"{r['decode_step_steady_s'] * 1e3:.3f}" if "decode_step_steady_s" in r else "-",
               f"{r['steady_over_max_floor']:.2f}" if "steady_over_max_floor" in r else "-",
               f"{r['gpu_idle_fraction']:.1%}" if "gpu_idle_fraction" in r else "-",
               f"{r['prefill_s'] * 1e3:.2f}",
               f"{r['prefill_over_matmul_floor']:.2f}"]
        if hf:
            h = hf.get(r["batch_size"])
            row += ["-", "-"] if h is None else [
                f"{h['decode_step_s'] * 1e3:.3f}",
                f"{h['decode_step_s'] / r['decode_step_s']:.2f}" if r["decode_step_s"] > 0
                else "-"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) + 2 for i, h in enumerate(header)]
    for row in [header, *rows]:
        lines.append("".join(cell.rjust(w) for cell, w in zip(row, widths)))
    return "\n".join(lines)


_TOP_OPS_SHOWN = 12


def format_top_ops(report: dict[str, Any]) -> str:
    """Where each batch's device time goes in the profiled decode steps (empty when not
    profiled)."""
    lines = []
    for r in report["results"]["engine"]:
        ops = r.get("gpu_top_ops")
        if not ops:
            continue
        lines.append(f"batch {r['batch_size']}: device ms per decode step by kernel "
                     f"(top {min(len(ops), _TOP_OPS_SHOWN)}; all {len(ops)} in the JSON)")
        for op in ops[:_TOP_OPS_SHOWN]:
            lines.append(f"  {op['ms_per_step']:8.3f}  x{op['calls_per_step']:<6.1f} "
                         f"{op['name'][:100]}")
    return "\n".join(lines)


def _with_floors(rows: list[dict[str, Any]], summary: dict[str, Any], input_len: int,
                 output_len: int, dev: dict[str, Any]) -> list[dict[str, Any]]:
    for row in rows:
        f = floors(summary, row["batch_size"], input_len, output_len, dev["bytes_per_s"],
                   dev["flops_per_s"])
        row.update(f)
        step = row["decode_step_s"]
        row["step_over_memory_floor"] = step / f["memory_floor_s"]
        row["step_over_matmul_floor"] = step / f["matmul_floor_s"]
        row["step_over_max_floor"] = step / max(f["memory_floor_s"], f["matmul_floor_s"])
        row["prefill_over_matmul_floor"] = row["prefill_s"] / f["prefill_matmul_floor_s"]
        if "decode_step_steady_s" in row:
            row["steady_over_max_floor"] = row["decode_step_steady_s"] / max(
                f["memory_floor_s"], f["matmul_floor_s"])
    return rows


def run_latency(args: argparse.Namespace) -> int:
    """Runs ``cacheflow bench latency``: prints the table, writes JSON if asked."""
    input_len, output_len, batch_sizes = check_latency_arguments(args)
    from cacheflow_models import load_tokenizer
    from cacheflow_runtime import resolve_device
    from cacheflow_serve.bench_common import (
        bench_tokenizer_path,
        check_fits,
        effective_engine_args,
        make_llm,
        model_summary,
        model_under_test,
        prompt_token_ids,
        release,
        report_header,
        write_report,
    )
    from cacheflow_serve.bench_gpu_busy import measure_gpu_busy
    from cacheflow_serve.bench_hf import HFGenerator

    device = resolve_device(args.device)
    max_num_seqs = args.max_num_seqs or batch_sizes[-1]
    dev = {**measure_copy_bandwidth(device), **measure_matmul_rate(device)}
    release(device)
    results: dict[str, Any] = {}
    with model_under_test(args, device) as model:
        config, summary = model_summary(model.path, args.dtype, device, args.max_model_len)
        check_fits(input_len + output_len, config.max_model_len)
        ids = prompt_token_ids(load_tokenizer(bench_tokenizer_path(args, model)),
                               config.vocab_size)
        if args.baseline == "hf":
            hf = HFGenerator(model.path, config.dtype, device)
            runner = _Runner(_hf_generate(hf), ids, input_len, args.seed, device)
            results["hf"] = _sweep(runner, batch_sizes, output_len, args, "HF generate")
            hf.close()
            release(device)
        llm = make_llm(args, model.path, max_num_seqs)
        engine_args = effective_engine_args(llm)
        runner = _Runner(_engine_generate(llm, not args.disable_detokenize), ids, input_len,
                         args.seed, device, StepClock(llm.engine))
        results["engine"] = _sweep(runner, batch_sizes, output_len, args, "engine")
        if device.type == "cuda" and args.gpu_busy_steps:
            for row in results["engine"]:
                prompts = runner.prompts(row["batch_size"])
                try:
                    row.update(measure_gpu_busy(llm.engine, prompts, args.gpu_busy_steps))
                except RuntimeError as exc:  # the step times stand without it
                    row["gpu_busy_error"] = str(exc)
                    print(f"GPU idle share at batch {row['batch_size']} not measured: {exc}")
        del llm, runner  # the engine's memory goes back before the folder is removed
        release(device)
    for rows in results.values():
        _with_floors(rows, summary, input_len, output_len, dev)
    workload = {"input_len": input_len, "output_len": output_len, "batch_sizes": batch_sizes,
                "num_iters": args.num_iters, "num_iters_warmup": args.num_iters_warmup,
                "gpu_busy_steps": args.gpu_busy_steps}
    report = {**report_header("latency", device, model, summary, workload, args, engine_args),
              "device_measurements": dev,
              "results": {"engine": results["engine"],
                          **({"hf": results["hf"]} if "hf" in results else {})}}
    print(format_table(report))
    top_ops = format_top_ops(report)
    if top_ops:
        print(top_ops)
    write_report(report, args.output_json)
    return 0
