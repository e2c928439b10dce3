"""``cacheflow bench throughput``: offline generation throughput of ``LLM.generate``.

``--num-prompts`` synthetic requests (prompt token ids drawn from the vocabulary; lengths from
``--input-len`` / ``--output-len``, each ``N`` or a uniform ``MIN:MAX``, seeded by ``--seed``)
go to one ``LLM.generate`` call after a short warm-up; every request generates exactly its
output length (``ignore_eos``, greedy). Reported: requests/s, total (prompt + output) tokens/s
and output tokens/s, and with ``--baseline hf`` the same for HF ``generate`` on the same prompts.
``--step-trace PATH`` also records every step of the timed run (one JSON line each, see
bench_step_trace.py) and prints where the time went by step kind (decode-only, mixed, prompt)
next to each kind's floor (copy bandwidth and matmul rate measured in the same run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from cacheflow_serve.bench_common import (
    LengthSpec,
    SyntheticRequest,
    add_model_arguments,
    check_model_arguments,
    describe_model,
    positive_int,
)
from cacheflow_serve.bench_step_trace import format_trace

if TYPE_CHECKING:
    import torch

    from cacheflow_serve.bench_common import ModelUnderTest

WARMUP_REQUESTS = 4
WARMUP_TOKENS = 4


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cacheflow bench throughput``."""
    parser.add_argument("--input-len", default="128",
                        help="prompt tokens: N, or MIN:MAX drawn uniformly per request")
    parser.add_argument("--output-len", default="128",
                        help="generated tokens: N, or MIN:MAX drawn uniformly per request")
    parser.add_argument("--num-prompts", type=int, default=1000,
                        help="synthetic requests (default: %(default)s)")
    parser.add_argument("--hf-max-batch-size", type=int, default=64,
                        help="prompts per HF generate call with --baseline hf")
    parser.add_argument("--step-trace", type=Path, default=None, metavar="PATH",
                        help="write one JSON line per step of the timed run here and print "
                             "the time by step kind next to its floor")
    add_model_arguments(parser)


def _rates(requests: int, prompt_tokens: int, output_tokens: int,
           seconds: float) -> dict[str, Any]:
    return {"elapsed_s": seconds, "num_requests": requests, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "total_tokens": prompt_tokens + output_tokens,
            "requests_per_s": requests / seconds,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / seconds,
            "output_tokens_per_s": output_tokens / seconds}


def run_engine(llm: Any, requests: list[SyntheticRequest], warmup: list[SyntheticRequest],
               device: torch.device, progress: bool,
               trace: Optional[tuple[Path, dict[str, Any]]] = None,
               detokenize: bool = True) -> dict[str, Any]:
    """Times one ``LLM.generate`` over all requests after an untimed one over ``warmup``;
    counts what came back. ``trace``: (path, model summary) to trace the timed run's steps
    (``--step-trace``); ``detokenize``: ``SamplingParams.detokenize``."""
    from cacheflow_runtime import SamplingParams
    from cacheflow_serve.bench_common import allocator_counters, synchronize
    from cacheflow_serve.bench_step_trace import StepTrace

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                              detokenize=detokenize)

    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warmup],
                 params(WARMUP_TOKENS), use_tqdm=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    sampling = [params(r.output_len) for r in requests]
    graphs_before = llm.engine.executor.cuda_graph_usage()
    synchronize(device)
    allocator_before = allocator_counters(device)
    preemptions_before = llm.engine.scheduler.num_preemptions
    tracer = StepTrace(llm, device.type == "cuda") if trace is not None else None
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=progress)
    synchronize(device)
    seconds = time.perf_counter() - start
    if tracer is not None:
        tracer.stop()
    allocator_after = allocator_counters(device)
    if tracer is not None:
        result_trace = _finish_trace(tracer, device, *trace)
    got = [len(o.outputs[0].token_ids) for o in outputs]
    result = _rates(len(outputs), sum(len(o.prompt_token_ids) for o in outputs), sum(got),
                    seconds)
    result["outputs_short_or_long"] = sum(g != r.output_len for g, r in zip(got, requests))
    result["preemptions"] = llm.engine.scheduler.num_preemptions - preemptions_before
    graphs_after = llm.engine.executor.cuda_graph_usage()
    if graphs_before is not None and graphs_after is not None:
        result["cuda_graphs"] = graph_usage_between(graphs_before, graphs_after)
    if allocator_before is not None and allocator_after is not None:
        result["cuda_allocator"] = {k: allocator_after[k] - allocator_before[k]
                                    for k in allocator_before}
    if tracer is not None:
        result["step_trace"] = result_trace
    return result


def _finish_trace(tracer: Any, device: torch.device, path: Path,
                  summary: dict[str, Any]) -> dict[str, Any]:
    """Times and floors of the traced steps (rates measured now), written to ``path``."""
    from cacheflow_serve.bench_latency import measure_copy_bandwidth, measure_matmul_rate

    bandwidth = measure_copy_bandwidth(device)["bytes_per_s"]
    flops = measure_matmul_rate(device)["flops_per_s"]
    tracer.finish(summary, bandwidth, flops)
    tracer.write(path)
    return {"path": str(path), "copy_bytes_per_s": bandwidth, "matmul_flops_per_s": flops,
            "by_kind": tracer.by_kind()}


def graph_usage_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The CUDA graph counters (``Executor.cuda_graph_usage``) of the steps between two
    snapshots, with their padding fraction."""
    keys = ("graph_steps", "graph_rows", "padding_rows", "eager_decode_steps")
    usage: dict[str, Any] = {k: after[k] - before[k] for k in keys}
    total = usage["graph_rows"] + usage["padding_rows"]
    usage["padding_fraction"] = usage["padding_rows"] / total if total else 0.0
    return usage


def run_hf(model: ModelUnderTest, requests: list[SyntheticRequest],
           warmup: list[SyntheticRequest], dtype: torch.dtype, device: torch.device,
           max_batch: int, progress: bool) -> dict[str, Any]:
    """HF ``generate`` over the requests in batches of ``max_batch`` (in request order), after
    an untimed batch of ``warmup``."""
    from tqdm.auto import tqdm

    from cacheflow_serve.bench_common import release, synchronize
    from cacheflow_serve.bench_hf import HFGenerator

    hf = HFGenerator(model.path, dtype, device)
    hf.generate([r.prompt_token_ids for r in warmup], WARMUP_TOKENS)
    batches = [requests[i:i + max_batch] for i in range(0, len(requests), max_batch)]
    generated = 0
    synchronize(device)
    start = time.perf_counter()
    for batch in tqdm(batches, desc="HF generate", unit="batch", disable=not progress):
        rows = hf.generate([r.prompt_token_ids for r in batch], max(r.output_len for r in batch))
        generated += sum(len(row) for row in rows)
    synchronize(device)
    seconds = time.perf_counter() - start
    hf.close()
    release(device)
    result = _rates(len(requests), sum(len(r.prompt_token_ids) for r in requests),
                    sum(r.output_len for r in requests), seconds)
    result["generated_tokens"] = generated  # rows run to the batch's longest output
    return result


def format_table(report: dict[str, Any]) -> str:
    """The throughput report as a plain-text table."""
    work = report["workload"]
    lines = [f"{describe_model(report)}; {work['num_prompts']} prompts, input "
             f"{work['input_len']}, output {work['output_len']} tokens, seed {work['seed']}",
             f"{'run':<8}{'seconds':>10}{'req/s':>10}{'total tok/s':>14}{'output tok/s':>14}"
             f"{'prompt tok':>12}{'output tok':>12}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<8}{r['elapsed_s']:>10.2f}{r['requests_per_s']:>10.2f}"
                     f"{r['total_tokens_per_s']:>14.1f}{r['output_tokens_per_s']:>14.1f}"
                     f"{r['prompt_tokens']:>12}{r['output_tokens']:>12}")
    if "hf" in report["results"]:
        ratio = report["results"]["hf"]["elapsed_s"] / report["results"]["engine"]["elapsed_s"]
        lines.append(f"engine: {ratio:.2f}x the speed of HF generate")
    graphs = report["results"]["engine"].get("cuda_graphs")
    if graphs is not None:
        lines.append(f"CUDA graphs: {graphs['graph_steps']} decode steps replayed "
                     f"({graphs['graph_rows']} sequence rows, {graphs['padding_rows']} padding "
                     f"rows: {graphs['padding_fraction']:.1%}), {graphs['eager_decode_steps']} "
                     "decode steps eager")
    allocator = report["results"]["engine"].get("cuda_allocator")
    if allocator is not None:
        lines.append(f"CUDA caching allocator during the run: {allocator['alloc_retries']} "
                     f"allocation retries (all cached blocks freed), "
                     f"{allocator['device_mallocs']} cudaMalloc, {allocator['device_frees']} "
                     "cudaFree")
    trace = report["results"]["engine"].get("step_trace")
    if trace is not None:
        lines.append(format_trace(trace["by_kind"], Path(trace["path"])))
    return "\n".join(lines)


def check_throughput_arguments(args: argparse.Namespace) -> tuple[LengthSpec, LengthSpec]:
    """Checks every option before anything loads; returns the length specs (ValueError)."""
    input_len = LengthSpec.parse(args.input_len, "--input-len")
    output_len = LengthSpec.parse(args.output_len, "--output-len")
    positive_int("--num-prompts", args.num_prompts)
    positive_int("--hf-max-batch-size", args.hf_max_batch_size)
    check_model_arguments(args)
    return input_len, output_len


def run_throughput(args: argparse.Namespace) -> int:
    """Runs ``cacheflow bench throughput``: prints the table, writes JSON if asked; exit status
    1 when an output is not its requested length."""
    input_len, output_len = check_throughput_arguments(args)
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
        synthetic_requests,
        write_report,
    )

    device = resolve_device(args.device)
    progress = not args.disable_tqdm
    max_num_seqs = args.max_num_seqs  # None: LLM's default for the device
    with model_under_test(args, device) as model:
        config, summary = model_summary(model.path, args.dtype, device, args.max_model_len)
        check_fits(input_len.high + output_len.high, config.max_model_len)
        ids = prompt_token_ids(load_tokenizer(bench_tokenizer_path(args, model)),
                               config.vocab_size)
        requests = synthetic_requests(args.num_prompts, input_len, output_len, ids, args.seed)
        # Warm-up prompts of their own, so that no cache could serve the timed ones.
        warmup = synthetic_requests(WARMUP_REQUESTS, input_len, output_len, ids, args.seed + 1)
        results: dict[str, Any] = {}
        if args.baseline == "hf":
            results["hf"] = run_hf(model, requests, warmup, config.dtype, device,
                                   args.hf_max_batch_size, progress)
        llm = make_llm(args, model.path, max_num_seqs)
        engine_args = effective_engine_args(llm)
        trace = None if args.step_trace is None else (args.step_trace, summary)
        results["engine"] = run_engine(llm, requests, warmup, device, progress, trace,
                                       not args.disable_detokenize)
        del llm  # the engine's memory goes back before the folder is removed
        release(device)
    results = {"engine": results["engine"], **{k: v for k, v in results.items()
                                               if k != "engine"}}
    workload = {"num_prompts": args.num_prompts, "input_len": str(input_len),
                "output_len": str(output_len)}
    report = {**report_header("throughput", device, model, summary, workload, args,
                              engine_args),
              "results": results}
    print(format_table(report))
    write_report(report, args.output_json)
    wrong = results["engine"]["outputs_short_or_long"]
    if wrong:
        print(f"cacheflow: error: {wrong} outputs were not their requested length",
              file=sys.stderr)
        return 1
    return 0
