"""``cacheflow bench prefix-caching``: a shared-prompt workload with the prefix cache off, then
on, in one process on one device.

``--num-prompts`` requests share one system prompt of ``--prefix-len`` random tokens, then have
``--input-len`` unique tokens each and generate exactly ``--output-len`` tokens (greedy,
``ignore_eos``). All requests arrive at once; each run goes through the engine step by step
(``LLM.engine``), so the time to first token of every request is seen. Reported per run:
elapsed seconds, total and output tokens/s, mean and p50 / p99 time to first token, and the
prompt tokens served from the cache; then the ratios on / off.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import TYPE_CHECKING, Any

from cacheflow_serve.bench_common import (
    add_model_arguments,
    check_model_arguments,
    describe_model,
    positive_int,
)

if TYPE_CHECKING:
    import torch


def add_prefix_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cacheflow bench prefix-caching``."""
    parser.add_argument("--prefix-len", type=int, default=2048,
                        help="tokens of the system prompt every request shares")
    parser.add_argument("--input-len", type=int, default=64,
                        help="unique prompt tokens per request after the shared prefix")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--num-prompts", type=int, default=256,
                        help="requests sharing the prefix (default: %(default)s)")
    add_model_arguments(parser)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_workload(llm: Any, prompts: list[list[int]], output_len: int,
                 device: torch.device, progress: bool, detokenize: bool = True) -> dict[str, Any]:
    """Adds every prompt at once and steps the engine to the end; times each request's first
    token and the whole run (``detokenize=False``: token ids only)."""
    from tqdm.auto import tqdm

    from cacheflow_runtime import SamplingParams
    from cacheflow_serve.bench_common import synchronize

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            detokenize=detokenize)
    synchronize(device)
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"bench-{i}", None, params, ids)
    first: dict[str, float] = {}
    done: dict[str, Any] = {}
    with tqdm(total=len(prompts), desc="requests", unit="req", disable=not progress) as bar:
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                    first[out.request_id] = now - start
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
    synchronize(device)
    seconds = time.perf_counter() - start
    ttft = list(first.values())
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in done.values())
    return {"elapsed_s": seconds, "num_requests": len(done), "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / seconds,
            "output_tokens_per_s": output_tokens / seconds,
            "mean_ttft_s": statistics.fmean(ttft), "p50_ttft_s": _percentile(ttft, 50),
            "p99_ttft_s": _percentile(ttft, 99),
            "cached_prompt_tokens": sum(o.num_cached_tokens or 0 for o in done.values()),
            "outputs_short_or_long": sum(len(o.outputs[0].token_ids) != output_len
                                         for o in done.values())}


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    w = report["workload"]
    lines = [f"{describe_model(report)}; {w['num_prompts']} prompts = shared {w['prefix_len']} "
             f"+ unique {w['input_len']} tokens, output {w['output_len']}",
             f"{'prefix cache':<14}{'seconds':>9}{'total tok/s':>13}{'output tok/s':>14}"
             f"{'mean TTFT s':>13}{'p99 TTFT s':>12}{'cached tok':>12}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<14}{r['elapsed_s']:>9.2f}{r['total_tokens_per_s']:>13.1f}"
                     f"{r['output_tokens_per_s']:>14.1f}{r['mean_ttft_s']:>13.3f}"
                     f"{r['p99_ttft_s']:>12.3f}{r['cached_prompt_tokens']:>12}")
    ratios = report["ratios"]
    lines.append(f"on / off: throughput {ratios['throughput']:.2f}x, mean TTFT "
                 f"{ratios['mean_ttft']:.3f}x")
    return "\n".join(lines)


def run_prefix(args: argparse.Namespace) -> int:
    """Runs ``cacheflow bench prefix-caching``: prints the table, writes JSON if asked; exit
    status 1 when an output is not its requested length."""
    for flag in ("prefix_len", "input_len", "output_len", "num_prompts"):
        positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
    check_model_arguments(args)
    if args.baseline is not None:
        raise ValueError("bench prefix-caching compares the engine with its prefix cache off and "
                         "on; --baseline hf is for bench throughput / latency")
    if hasattr(args, "enable_prefix_caching"):
        raise ValueError("bench prefix-caching runs with the prefix cache off, then on; leave "
                         "out --enable-prefix-caching / --no-enable-prefix-caching")
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

    device = resolve_device(args.device)
    progress = not args.disable_tqdm
    max_num_seqs = args.max_num_seqs  # None: LLM's default for the device
    results: dict[str, Any] = {}
    with model_under_test(args, device) as model:
        config, summary = model_summary(model.path, args.dtype, device, args.max_model_len)
        check_fits(args.prefix_len + args.input_len + args.output_len, config.max_model_len)
        ids = prompt_token_ids(load_tokenizer(bench_tokenizer_path(args, model)),
                               config.vocab_size)
        rng = random.Random(args.seed)
        prefix = rng.choices(ids, k=args.prefix_len)
        prompts = [prefix + rng.choices(ids, k=args.input_len) for _ in range(args.num_prompts)]
        for name, caching in (("off", False), ("on", True)):
            args.enable_prefix_caching = caching
            llm = make_llm(args, model.path, max_num_seqs)
            engine_args = effective_engine_args(llm)
            del engine_args["enable_prefix_caching"]  # off, then on: the results say which
            # Warm-up on other tokens: CUDA graphs, allocator, kernels; no shared prefix.
            run_workload(llm, [rng.choices(ids, k=32) for _ in range(4)], 4, device, False,
                         not args.disable_detokenize)
            llm.reset_prefix_cache()
            results[name] = run_workload(llm, prompts, args.output_len, device, progress,
                                         not args.disable_detokenize)
            del llm
            release(device)
    workload = {"num_prompts": args.num_prompts, "prefix_len": args.prefix_len,
                "input_len": args.input_len, "output_len": args.output_len}
    report = {**report_header("prefix-caching", device, model, summary, workload, args,
                              engine_args),
              "results": results,
              "ratios": {"throughput": results["on"]["total_tokens_per_s"]
                         / results["off"]["total_tokens_per_s"],
                         "mean_ttft": results["on"]["mean_ttft_s"]
                         / results["off"]["mean_ttft_s"]}}
    print(format_table(report))
    write_report(report, args.output_json)
    return 1 if any(r["outputs_short_or_long"] for r in results.values()) else 0
