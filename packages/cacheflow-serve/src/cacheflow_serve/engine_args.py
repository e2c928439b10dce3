"""The engine options of the ``cacheflow`` command: one flag per ``LLM`` keyword, vLLM's names.

``add_engine_arguments`` adds them to a parser; ``llm_kwargs`` turns the parsed options back into
``LLM`` keywords. Options left out on the command line are not passed, so ``LLM``'s own defaults
apply (stated in each help text). Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
from typing import Any

#: ``LLM`` keyword -> its flag where the flag is not the keyword with dashes (vLLM's names).
RENAMED_FLAGS = {"kv_cache_blocks": "--num-gpu-blocks-override"}
#: Older spellings still accepted (they were accepted before; nothing accepted is lost).
ALIASES = {"kv_cache_blocks": ["--kv-cache-blocks"], "tensor_parallel_size": ["-tp"]}


def flag_for(keyword: str) -> str:
    """The command-line flag of an ``LLM`` keyword."""
    return RENAMED_FLAGS.get(keyword, "--" + keyword.replace("_", "-"))


# keyword -> add_argument options (all but ``dest`` and ``default``, set below). Values are
# validated by LLM itself (a ValueError naming the option ends the command with status 2).
_OPTIONS: dict[str, dict[str, Any]] = {
    "dtype": dict(help="weights and activations dtype (default: auto = float32 on CPU, the "
                       "checkpoint's half type on GPUs)"),
    "device": dict(help="cpu, cuda or cuda:N (default: auto = cuda when available)"),
    "seed": dict(type=int, help="engine seed for requests without their own (default: 0)"),
    "block_size": dict(type=int, help="tokens per KV-cache block: 8, 16 or 32 (default: 16)"),
    "kv_cache_blocks": dict(type=int, metavar="N",
                            help="number of device KV-cache blocks, instead of sizing the "
                                 "cache from free memory (default: sized from memory)"),
    "swap_space": dict(type=float, metavar="GIB",
                           help="CPU swap space for preempted sequences, GiB (default: 4)"),
    "preemption_mode": dict(help="how preempted sequences come back: recompute or swap "
                                 "(default: recompute)"),
    "max_num_seqs": dict(type=int,
                         help="sequences in one batch at most (default: by device, 1024 on "
                              "GPUs of 70 GiB or more but A100s, else 256)"),
    "max_num_batched_tokens": dict(type=int,
                                   help="token budget of one step; with chunked prefill, by "
                                        "default 16384 offline / 8192 serving on GPUs of 70 GiB "
                                        "or more but A100s, 8192 / 2048 on other GPUs, 2048 on "
                                        "the CPU; without it max(max_model_len, 2048)"),
    "max_model_len": dict(type=int,
                          help="context length (default: the model's)"),
    "gpu_memory_utilization": dict(type=float, metavar="FRACTION",
                                   help="share of GPU memory the engine may use (default: 0.9)"),
    "enforce_eager": dict(action="store_true",
                          help="run every step from Python (no CUDA graphs of decode steps)"),
    "enable_prefix_caching": dict(action=argparse.BooleanOptionalAction,
                                  help="share the KV blocks of common prompt prefixes between "
                                       "requests (default: on)"),
    "enable_chunked_prefill": dict(action=argparse.BooleanOptionalAction,
                                   help="mix decodes with chunks of prompts in one token budget "
                                        "per step (default: on)"),
    "async_scheduling": dict(action=argparse.BooleanOptionalAction,
                             help="schedule each step while the one before runs on the device, "
                                  "hiding the host's work behind the device's; steps that need "
                                  "the previous tokens first run in order (default: on)"),
    "kv_cache_dtype": dict(help="KV cache storage: auto (the model's dtype) or fp8 (FP8 E4M3, "
                                "alias fp8_e4m3: twice the tokens in the same memory) "
                                "(default: auto)"),
    "tensor_parallel_size": dict(type=int,
                                 help="split the model over this many GPUs (or CPU processes) "
                                      "(default: 1)"),
    "distributed_executor_backend": dict(choices=["mp", "ray"],
                                         help="who runs the ranks: one process per GPU on this "
                                              "host (mp) or Ray actors across the hosts of a Ray "
                                              "cluster (default: mp when the size is > 1)"),
    "tokenizer": dict(help="folder or .gguf file holding the tokenizer, when not with the model "
                           "(default: the model's)"),
    "skip_tokenizer_init": dict(action="store_true",
                                help="load no tokenizer: prompts must be token ids and outputs "
                                     "carry token ids only"),
    "generation_config": dict(metavar="auto|vllm|none|FOLDER",
                              help="where default sampling parameters come from when a request "
                                   "leaves them unset: auto = the model's generation config "
                                   "(generation_config.json, GGUF sampling metadata); vllm or "
                                   "none = SamplingParams' defaults; or a folder holding a "
                                   "generation_config.json (default: auto)"),
    "logprobs_mode": dict(choices=["raw_logprobs", "raw_logits", "processed_logprobs",
                                   "processed_logits"],
                          help="what reported logprobs are: the model's raw distribution (or "
                               "logits), or the one sampled from after temperature, penalties "
                               "and top-k / top-p / min-p (default: raw_logprobs)"),
    "trust_remote_code": dict(action="store_true",
                              help="taken for vLLM's command lines: cacheflow runs its own model "
                                   "code only, never a checkpoint's"),
    "disable_log_stats": dict(action=argparse.BooleanOptionalAction,
                              help="taken for vLLM's command lines: no periodic statistics are "
                                   "logged either way (the server's are at /metrics)"),
}


def add_engine_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """Adds one flag per ``LLM`` keyword (but those in ``skip``) in an "engine" group."""
    group = parser.add_argument_group("engine options (as LLM(...) takes them)")
    for keyword, options in _OPTIONS.items():
        if keyword in skip:
            continue
        flags = [flag_for(keyword), *ALIASES.get(keyword, [])]
        default = False if options.get("action") == "store_true" else argparse.SUPPRESS
        group.add_argument(*flags, dest=keyword, default=default, **options)


def llm_kwargs(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``LLM`` keywords given on the command line (left-out options are not passed)."""
    kwargs = {k: getattr(args, k) for k in _OPTIONS if k not in skip and hasattr(args, k)}
    for flag in ("enforce_eager", "skip_tokenizer_init", "trust_remote_code"):
        if not kwargs.get(flag, True):
            del kwargs[flag]
    return kwargs
