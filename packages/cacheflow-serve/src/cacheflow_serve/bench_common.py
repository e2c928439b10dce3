"""What ``cacheflow bench throughput`` and ``cacheflow bench latency`` share: the model and engine
options, synthetic requests with seeded lengths, the model under test (a path or a random
checkpoint written for the run), the report header (card, versions, date) and JSON output.

Module level imports only the standard library: torch and transformers load when a benchmark
runs, not when the ``cacheflow`` command parses its arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

from cacheflow_serve.engine_args import add_engine_arguments, llm_kwargs

if TYPE_CHECKING:
    import torch

    from cacheflow_serve.llm import LLM


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Prints ``PROG: error: MESSAGE`` and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class LengthSpec:
    """A token count: fixed (``low == high``) or uniform over ``[low, high]``, both included."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, flag: str) -> LengthSpec:
        """``"128"`` or ``"16:1024"``; ValueError naming ``flag`` otherwise."""
        parts = str(text).split(":")
        try:
            if len(parts) not in (1, 2):
                raise ValueError
            low, high = int(parts[0]), int(parts[-1])
        except ValueError:
            raise ValueError(f"{flag} must be N or MIN:MAX (integers), got {text!r}") from None
        if not 1 <= low <= high:
            raise ValueError(f"{flag} must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, "
                             f"got {text!r}")
        return cls(low, high)

    @property
    def fixed(self) -> bool:
        """True for a single length."""
        return self.low == self.high

    def sample(self, rng: random.Random) -> int:
        """One length."""
        return self.low if self.fixed else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.fixed else f"{self.low}:{self.high}"


@dataclass
class SyntheticRequest:
    """One benchmark request: prompt token ids and the exact number of tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int


def synthetic_requests(count: int, input_len: LengthSpec, output_len: LengthSpec,
                       token_ids: list[int], seed: int) -> list[SyntheticRequest]:
    """``count`` requests with lengths drawn from the specs and prompt tokens drawn uniformly
    from ``token_ids``; the same seed gives the same requests."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        n_in, n_out = input_len.sample(rng), output_len.sample(rng)
        requests.append(SyntheticRequest(rng.choices(token_ids, k=n_in), n_out))
    return requests


def prompt_token_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """The ids a synthetic prompt draws from: the model's vocabulary less the special tokens."""
    limit = min(vocab_size, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(limit) if i not in special]
    if not ids:
        raise ValueError("the tokenizer has no regular token to build prompts from")
    return ids


def positive_int(flag: str, value: Optional[int]) -> None:
    """ValueError naming ``flag`` unless ``value`` is None or a positive integer."""
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")


#: LLM keywords the benchmarks define themselves (their own help or meaning: --seed also seeds
#: the synthetic workload) or do not take (the benchmarks draw prompts from the tokenizer and
#: sample greedily).
BENCH_OWN_OPTIONS = ("dtype", "device", "seed", "max_num_seqs", "skip_tokenizer_init",
                     "generation_config")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which model runs and how the engine is configured: every
    ``LLM`` keyword under its ``cacheflow generate`` flag (``--kv-cache-dtype``,
    ``--tensor-parallel-size``, ``--block-size``, ...) plus the benchmark's model choice."""
    from cacheflow_serve.random_checkpoint import PRESETS

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    model.add_argument("--random-weights", action="store_true",
                       help="write a random checkpoint of --hf-config's shape to a temporary "
                            "folder and run that")
    model.add_argument("--hf-config", default=None, metavar="NAME_OR_JSON",
                       help=f"shape of the random checkpoint: a preset ({', '.join(PRESETS)}), "
                            "a config.json path, or an inline JSON object (may start from "
                            "{\"preset\": NAME, ...})")
    model.add_argument("--dtype", default="auto",
                       help="float16, bfloat16 or float32 (auto: float32 on CPU; on a GPU the "
                            "checkpoint's half type, and random checkpoints written in float16)")
    model.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    model.add_argument("--max-num-seqs", type=int, default=None,
                       help="sequences per step (default: LLM's for the device, 1024 on GPUs "
                            "of 70 GiB or more but A100s, else 256; latency: the largest batch)")
    # Every other LLM keyword, as `cacheflow generate` / `serve` take it (engine_args.py).
    # Left out, they are not passed and LLM's own defaults apply; max_model_len is also read by
    # the benchmarks (the model summary), so it is always there.
    add_engine_arguments(parser, skip=BENCH_OWN_OPTIONS)
    parser.set_defaults(max_model_len=None)
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the synthetic lengths and prompts and of the random weights")
    run.add_argument("--baseline", choices=["hf"], default=None,
                     help="also run HF transformers generate on the same prompts, same dtype")
    run.add_argument("--disable-detokenize", action="store_true",
                     help="return token ids only (SamplingParams.detokenize=False): the engine's "
                          "time without turning outputs into text")
    run.add_argument("--output-json", type=Path, default=None, help="write the report here")
    run.add_argument("--disable-tqdm", action="store_true", help="no progress bars")


def check_model_arguments(args: argparse.Namespace) -> None:
    """Checks the options of ``add_model_arguments`` that need no torch (ValueError)."""
    if args.random_weights:
        if args.hf_config is None:
            raise ValueError("--random-weights needs --hf-config NAME_OR_JSON")
        if args.model is not None:
            raise ValueError("give either --model or --random-weights, not both")
    elif args.hf_config is not None:
        raise ValueError("--hf-config is only used with --random-weights")
    for flag in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_blocks"):
        positive_int("--" + flag.replace("_", "-"), getattr(args, flag, None))
    check_output_path("--output-json", args.output_json)
    check_output_path("--step-trace", getattr(args, "step_trace", None))
    utilization = getattr(args, "gpu_memory_utilization", None)
    if utilization is not None and not 0 < utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")


def check_output_path(flag: str, path: Optional[Path]) -> None:
    """ValueError unless ``path`` (None: not asked for) is a file this process can write: its
    folder exists and is writable, and it is not a folder itself or a file it may not
    overwrite. Checked before a benchmark runs, so that no result is lost at its end."""
    if path is None:
        return
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a folder; give a file path")
    if not folder.is_dir():
        raise ValueError(f"{flag}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists()
                                                    and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag}: {str(path)!r} cannot be written (permission denied)")


def checkpoint_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype a random checkpoint is written in: ``dtype``, or for "auto" float32 on the CPU
    (what the engine runs there) and float16 on a GPU."""
    import torch

    from cacheflow_runtime import parse_dtype

    if dtype != "auto":
        return parse_dtype(dtype)
    return torch.float32 if device.type == "cpu" else torch.float16


@dataclass
class ModelUnderTest:
    """The checkpoint a benchmark runs and how the report names it."""

    path: Path
    description: dict[str, Any]


@contextlib.contextmanager
def model_under_test(args: argparse.Namespace, device: torch.device) -> Iterator[ModelUnderTest]:
    """The model of ``--model``, or a random checkpoint of ``--hf-config`` written to a temporary
    folder (removed afterwards)."""
    from cacheflow_models import default_model_path

    if not args.random_weights:
        path = Path(args.model) if args.model is not None else default_model_path()
        if not path.exists():
            raise FileNotFoundError(f"model path {str(path)!r} does not exist")
        yield ModelUnderTest(path, {"path": str(path), "random_weights": False})
        return
    from cacheflow_serve.random_checkpoint import (
        build_hf_config,
        hf_config_fields,
        write_random_checkpoint,
    )

    fields = hf_config_fields(args.hf_config)
    config = build_hf_config(fields)
    dtype = checkpoint_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory(prefix="cacheflow-random-") as tmp:
        path = write_random_checkpoint(config, Path(tmp) / "model", dtype, device, args.seed,
                                       progress=not args.disable_tqdm)
        yield ModelUnderTest(path, {"random_weights": True, "hf_config": args.hf_config,
                                    "checkpoint_dtype": str(dtype).removeprefix("torch.")})


def bench_tokenizer_path(args: argparse.Namespace, model: ModelUnderTest) -> Path:
    """Where the benchmark's prompt tokens come from: ``--tokenizer`` when given (as the engine
    takes it), else the model's folder."""
    given = getattr(args, "tokenizer", None)
    return Path(given) if given is not None else model.path


def make_llm(args: argparse.Namespace, path: Path, max_num_seqs: Optional[int]) -> LLM:
    """The engine under test, configured from the options."""
    from cacheflow_serve.llm import LLM

    return LLM(path, dtype=args.dtype, device=args.device, seed=args.seed,
               max_num_seqs=max_num_seqs, **engine_options(args))


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``LLM`` keywords of the engine options given on the command line (and
    ``max_model_len``, None when left out)."""
    return llm_kwargs(args, skip=BENCH_OWN_OPTIONS)


def release(device: torch.device) -> None:
    """Collects garbage and returns cached device memory, so the next run sizes its cache
    from what is really free."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: torch.cuda.memory_stats counters that cost the step loop a device-wide wait: an allocation
#: that found no cached block and no room (every cached block freed, then retried), and the
#: driver allocations and frees behind the caching allocator.
ALLOCATOR_COUNTERS = {"alloc_retries": "num_alloc_retries", "device_mallocs": "num_device_alloc",
                      "device_frees": "num_device_free"}


def allocator_counters(device: torch.device) -> Optional[dict[str, int]]:
    """The caching allocator's counters (ALLOCATOR_COUNTERS) on a CUDA device, else None."""
    if device.type != "cuda":
        return None
    import torch

    stats = torch.cuda.memory_stats(device)
    return {name: int(stats.get(key, 0)) for name, key in ALLOCATOR_COUNTERS.items()}


def environment(device: torch.device) -> dict[str, Any]:
    """Card, software versions and the date (UTC) of this run."""
    import datetime
    import importlib.metadata
    import platform

    import torch

    versions = {}
    for dist in ("cacheflow-serve", "cacheflow-runtime", "cacheflow-models", "cacheflow-kernels",
                 "transformers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
        cuda = torch.version.cuda
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, "\
               f"{torch.get_num_threads()} threads)"
        cuda = None
    return {"card": card, "device": str(device), "torch": torch.__version__, "cuda": cuda,
            "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def model_summary(path: Path, dtype: str, device: torch.device,
                  max_model_len: Optional[int]) -> tuple[Any, dict[str, Any]]:
    """The runtime's ModelConfig of the checkpoint and a summary for the report: shape,
    parameter count and bytes, KV bytes per token."""
    from cacheflow_models import build_model_config
    from cacheflow_serve.random_checkpoint import parameter_count

    config = build_model_config(path, dtype, max_model_len, device.type)
    itemsize = config.dtype.itemsize
    params = parameter_count(config.hf_config)
    return config, {
        "architecture": config.architecture, "num_layers": config.num_layers,
        "hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
        "num_kv_heads": config.num_kv_heads, "head_size": config.head_size,
        "vocab_size": config.vocab_size, "max_model_len": config.max_model_len,
        "dtype": str(config.dtype).removeprefix("torch."), "parameters": params,
        "parameter_bytes": params * itemsize,
        "kv_bytes_per_token": 2 * config.num_layers * config.num_kv_heads * config.head_size
        * itemsize,
    }


def check_fits(longest: int, max_model_len: int) -> None:
    """ValueError unless the longest prompt plus its output fits the model's context."""
    if longest > max_model_len:
        raise ValueError(f"the longest prompt plus output ({longest} tokens) is more than "
                         f"max_model_len ({max_model_len}); lower --input-len / --output-len")


def effective_engine_args(llm: LLM) -> dict[str, Any]:
    """What the engine under test ran with (defaults resolved): its limits, KV cache and step
    options, as the report's ``engine_args`` states them."""
    engine = llm.llm_engine
    sched, cache = engine.scheduler_config, engine.cache_config
    return {"max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "max_model_len": sched.max_model_len, "kv_cache_blocks": engine.num_device_blocks,
            "block_size": cache.block_size, "kv_cache_dtype": cache.cache_dtype,
            "enable_prefix_caching": cache.enable_prefix_caching,
            "enable_chunked_prefill": sched.enable_chunked_prefill,
            "async_scheduling": sched.async_scheduling,
            "enforce_eager": engine.enforce_eager, "cuda_graphs": engine.uses_cuda_graphs,
            "tensor_parallel_size": engine.parallel_config.tensor_parallel_size}


def report_header(benchmark: str, device: torch.device, model: ModelUnderTest,
                  summary: dict[str, Any], workload: dict[str, Any], args: argparse.Namespace,
                  engine_args: dict[str, Any]) -> dict[str, Any]:
    """The part of a report that says what ran where: card, versions, date, model, workload
    and the engine options given (``engine_args``: :func:`effective_engine_args` over them)."""
    return {"benchmark": benchmark, "environment": environment(device),
            "model": {**model.description, **summary},
            "workload": {**workload, "seed": args.seed,
                         "sampling": "greedy, ignore_eos" + (", detokenize=False"
                                                            if args.disable_detokenize else "")},
            "engine_args": {**engine_options(args), **engine_args}}


def describe_model(report: dict[str, Any]) -> str:
    """One line naming the card, dtype and model shape of a report."""
    model = report["model"]
    params, size = model["parameters"], model["parameter_bytes"]
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    size_text = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.2f} MB"
    return (f"{report['environment']['card']}, {model['dtype']}: {model['architecture']} "
            f"{model['num_layers']} layers, hidden {model['hidden_size']}, {count} parameters "
            f"({size_text})")


def write_report(report: dict[str, Any], path: Optional[Path]) -> None:
    """Writes the JSON report if a path was given."""
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
