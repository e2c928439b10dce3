"""The ``cacheflow`` command.

Only argparse and the option tables are imported before the arguments are parsed: torch,
transformers and the engine come in when a subcommand runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from cacheflow_serve.bench import add_bench_arguments, run_bench
from cacheflow_serve.bench_common import OneLineErrorParser
from cacheflow_serve.bench_latency import add_latency_arguments, run_latency
from cacheflow_serve.bench_prefix import add_prefix_arguments, run_prefix
from cacheflow_serve.bench_throughput import add_throughput_arguments, run_throughput
from cacheflow_serve.client_cli import add_client_arguments, run_chat, run_complete
from cacheflow_serve.engine_args import add_engine_arguments, llm_kwargs
from cacheflow_serve.serve_cli import add_serve_arguments, run_serve

# ``generate`` states its sampling options itself (its --seed is the request's seed).
_GENERATE_SKIPS = ("seed", "generation_config", "skip_tokenizer_init")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cacheflow`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="cacheflow", description="cacheflow LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--model", default=None,
                     help="checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=64,
                     help="most tokens to generate per prompt (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus sampling: the smallest set of tokens whose probability "
                          "reaches this (default: %(default)s, off)")
    gen.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    # --seed above is the request's; the engine seed keeps LLM's default here.
    add_engine_arguments(gen, skip=_GENERATE_SKIPS)
    add_serve_arguments(sub.add_parser("serve", help="run the OpenAI-compatible HTTP server"))
    add_client_arguments(sub.add_parser("chat", help="chat with the model of a running server"),
                         chat=True)
    add_client_arguments(sub.add_parser("complete", help="complete prompts with the model of a "
                                                         "running server"), chat=False)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True,
                                     parser_class=OneLineErrorParser)
    add_bench_arguments(bench_sub.add_parser(
        "serve", help="replay requests against a running server; report latency percentiles"))
    add_throughput_arguments(bench_sub.add_parser(
        "throughput", help="offline generation throughput of LLM.generate on synthetic prompts"))
    add_latency_arguments(bench_sub.add_parser(
        "latency", help="decode step and prefill time per batch size, next to the floors "
                        "measured on the same device"))
    add_prefix_arguments(bench_sub.add_parser(
        "prefix-caching", help="a shared-prompt workload with the prefix cache off, then on"))
    return parser


def run_generate(args: argparse.Namespace) -> int:
    """Runs ``cacheflow generate``; prints each prompt's completion."""
    from cacheflow_runtime import SamplingParams
    from cacheflow_serve.llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    llm = LLM(args.model, **llm_kwargs(args, skip=_GENERATE_SKIPS))
    prompts = args.prompts
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                           use_tqdm=len(prompts) > 1)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for original, out in zip(args.prompts, outputs):
        if len(outputs) > 1:
            print(f"### {original}")
        print(out.outputs[0].text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cacheflow`` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "chat":
            return run_chat(args)
        if args.command == "complete":
            return run_complete(args)
        if args.command == "bench":
            if args.bench_command == "throughput":
                return run_throughput(args)
            if args.bench_command == "latency":
                return run_latency(args)
            if args.bench_command == "prefix-caching":
                return run_prefix(args)
            return run_bench(args)
    except (ValueError, OSError) as exc:  # user errors (cacheflow_runtime.errors), bad paths
        print(f"cacheflow: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 1


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (the lines of a multi-line message joined by "; ")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
