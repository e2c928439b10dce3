"""``cacheflow-models check PATH``: does our port of a checkpoint's architecture match HF?

Loads the checkpoint with our engine and with HF transformers (float32 on the CPU by default),
runs a batch of prompts greedily through both and prints a verdict table:

- weight coverage: every parameter loaded, no checkpoint tensor left over (strict loading);
- greedy tokens, per prompt: identical to HF's;
- max logprob difference of the chosen tokens (before any divergence);
- hidden states per decoder layer on one prompt, naming the first layer that diverges;
- tensor-parallel shards: for each size in ``--tp-sizes`` that divides the heads, every rank's
  model is built and loaded in this process and its slices must put together the full tensors.

Exits with 1 if any check fails, 0 otherwise. ``--model-class pkg.mod:Class`` checks a class
that is not registered yet (the checkpoint's config still decides what HF loads).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch

from cacheflow_models.checks.outputs import (
    build_engine,
    engine_greedy,
    engine_layer_states,
    first_difference,
    first_divergent_layer,
    hf_greedy,
    hf_layer_states,
    layer_differences,
    load_hf_model,
)
from cacheflow_models.checks.report import FAIL, PASS, SKIP, WARN, Report
from cacheflow_models.checks.shards import shard_round_trip, tp_size_problem
from cacheflow_models.hf_config import build_model_config
from cacheflow_models.tokenizer import load_tokenizer
from cacheflow_runtime.config import ModelConfig

DEFAULT_PROMPTS = (
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In a distant future, the last library on Earth kept its books in a vault beneath the sea,",
)
# Tolerances by dtype: chosen-token logprobs, and per-layer hidden states relative to
# max(1, the largest HF value of the layer).
LOGPROB_TOL = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}
LAYER_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line of ``cacheflow-models``."""
    parser = argparse.ArgumentParser(prog="cacheflow-models",
                                     description="Tools for cacheflow model ports.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="compare our engine with HF transformers on a checkpoint",
                           description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("path", help="checkpoint folder or .gguf file")
    check.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    check.add_argument("--dtype", default="float32",
                       help="float32 (default; exact comparison), float16 or bfloat16")
    check.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), metavar="TEXT",
                       help="prompt texts, tokenized with the checkpoint's tokenizer")
    check.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    check.add_argument("--tp-sizes", default="2,4",
                       help="comma-separated tensor-parallel sizes for the shard round trip "
                            "('' for none)")
    check.add_argument("--model-class", default=None, metavar="MODULE:CLASS",
                       help="check this class instead of the registered one")
    args = parser.parse_args(argv)
    try:
        args.tp_sizes = [int(s) for s in args.tp_sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--tp-sizes must be comma-separated integers, got {args.tp_sizes!r}")
    if args.max_tokens < 1 or any(s < 1 for s in args.tp_sizes):
        parser.error("--max-tokens and --tp-sizes must be positive")
    return args


def check_outputs(report: Report, engine: Any, hf: Any, model_config: ModelConfig,
                  prompts: list[list[int]], max_tokens: int) -> None:
    """Greedy tokens per prompt, the logprob difference, and the per-layer hidden states."""
    dtype = model_config.dtype
    strict = dtype == torch.float32
    ours = engine_greedy(engine, prompts, max_tokens)
    worst_lp, worst_prompt = 0.0, 0
    divergent = None
    for i, (prompt, mine) in enumerate(zip(prompts, ours)):
        ref = hf_greedy(hf, prompt, max_tokens)
        first = first_difference(mine.tokens, ref.tokens)
        agree = len(ref.tokens) if first is None else first
        if first is None:
            report.add(f"greedy tokens, prompt {i}", PASS,
                       f"{agree}/{len(ref.tokens)} tokens equal HF's ({len(prompt)}-token prompt)")
        else:
            divergent = i if divergent is None else divergent
            report.add(f"greedy tokens, prompt {i}", FAIL if strict else WARN,
                       f"first divergence at token {first}: ours {mine.tokens[first]}, HF "
                       f"{ref.tokens[first]} ({len(prompt)}-token prompt)")
        for a, b in zip(mine.logprobs[:agree], ref.logprobs):  # same context, same token
            if not abs(a - b) <= worst_lp:
                worst_lp, worst_prompt = abs(a - b), i
    tol = LOGPROB_TOL[dtype]
    report.add("max logprob difference", PASS if worst_lp <= tol else FAIL if strict else WARN,
               f"{worst_lp:.3g} (prompt {worst_prompt}; tolerance {tol:g})")

    index = divergent if divergent is not None else max(range(len(prompts)),
                                                        key=lambda k: len(prompts[k]))
    num_layers = model_config.num_layers
    diffs = layer_differences(engine_layer_states(engine, prompts[index], num_layers),
                              hf_layer_states(hf, prompts[index]))
    layer_tol = LAYER_TOL[dtype]
    bad = first_divergent_layer(diffs, layer_tol)
    if len(diffs) <= 8:
        shown = ", ".join(f"{d:.2g}" for d, _ in diffs)
    else:
        top = max(range(len(diffs)), key=lambda k: diffs[k][0])
        shown = f"largest {diffs[top][0]:.2g} at layer {top}"
    if bad is None:
        report.add("hidden states per layer", PASS,
                   f"{num_layers} layers within {layer_tol:g} of HF on prompt {index} "
                   f"(max abs diff per layer: {shown})")
    else:
        where = " (output after the final norm)" if bad == num_layers - 1 else ""
        report.add("hidden states per layer", FAIL,
                   f"outputs diverge at layer {bad}{where}: max abs diff {diffs[bad][0]:.3g} "
                   f"> {layer_tol:g} x {max(1.0, diffs[bad][1]):.3g} on prompt {index} "
                   f"(per layer: {shown})")


def check_shards(report: Report, model_config: ModelConfig, full: Any,
                 tp_sizes: list[int]) -> None:
    """The tensor-parallel shard round trip for each size."""
    for size in tp_sizes:
        name = f"tensor parallel, tp={size}"
        problem = tp_size_problem(model_config, size)
        if problem is not None:
            report.add(name, SKIP, problem)
            continue
        try:
            ok, detail = shard_round_trip(model_config, full, size)
        except ValueError as exc:  # a size the layers cannot split (e.g. the MLP width)
            report.add(name, SKIP, f"cannot build rank models: {exc}")
            continue
        report.add(name, PASS if ok else FAIL, detail)


def run_check(args: argparse.Namespace) -> Report:
    """Runs every check of ``cacheflow-models check`` and returns the table."""
    device_type = args.device.split(":")[0]
    model_config = build_model_config(args.path, args.dtype, None, device_type)
    if args.model_class:
        model_config.architecture = args.model_class
    dtype = model_config.dtype
    report = Report(f"cacheflow-models check {args.path}\n{model_config.architecture}, "
                    f"{str(dtype).removeprefix('torch.')} on {args.device}")
    tokenizer = load_tokenizer(args.path)
    prompts = [list(tokenizer.encode(text)) for text in args.prompts]
    longest = max(len(p) for p in prompts) + args.max_tokens
    if longest > model_config.max_model_len:
        raise ValueError(f"the longest prompt plus --max-tokens is {longest} tokens, more than "
                         f"the model's {model_config.max_model_len}")
    try:
        engine = build_engine(model_config, tokenizer, prompts, args.max_tokens, args.device)
    except ValueError as exc:  # WeightLoadError is a ValueError
        report.add("weight coverage", FAIL, str(exc))
        return report
    full = engine.get_model()
    count = len(list(full.named_parameters()))
    report.add("weight coverage", PASS,
               f"all {count} parameters loaded from the checkpoint, no tensor left over")
    hf = load_hf_model(args.path, dtype, args.device)
    check_outputs(report, engine, hf, model_config, prompts, args.max_tokens)
    del hf
    check_shards(report, model_config, full, args.tp_sizes)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cacheflow-models`` command; returns the exit status."""
    args = parse_args(argv)
    try:
        report = run_check(args)
    except (OSError, ValueError) as exc:
        print(f"cacheflow-models check: error: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
