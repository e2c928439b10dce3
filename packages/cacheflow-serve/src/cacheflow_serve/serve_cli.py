"""The ``cacheflow serve`` subcommand: its options and how it starts the server (the heavy
imports happen only when it runs, so the other subcommands start fast)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

API_KEY_ENV = "CACHEFLOW_API_KEY"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cacheflow serve``."""
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tokenizer", default=None,
                        help="folder or .gguf file of the tokenizer (default: the model's)")
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="load no tokenizer: prompts must be token ids, outputs carry "
                             "token ids (text is empty)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every /v1 route "
                             f"(default: ${API_KEY_ENV} if set)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) clients use (default: the model path)")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="answer 429 when this many requests wait for their first token")
    parser.add_argument("--shutdown-grace-period", type=float, default=5.0,
                        help="seconds in-flight requests get to finish on SIGTERM")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-blocks", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="KV cache storage: auto (the model's dtype) or fp8 (FP8 E4M3, "
                        "alias fp8_e4m3: twice the tokens in the same memory)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step from Python (no CUDA graphs of decode steps)")
    add_core_arguments(parser)
    add_parallel_arguments(parser)
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])


def add_core_arguments(parser: argparse.ArgumentParser) -> None:
    """Prefix caching and chunked prefill switches (vLLM's names), shared by the subcommands
    that build an engine."""
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="share the KV blocks of common prompt prefixes between requests "
                             "(default: on)")
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="mix decodes with chunks of prompts in one token budget per step "
                             "(default: on)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one step (default: 2048 with chunked prefill, "
                             "else max(max_model_len, 2048))")


def resolve_api_key(given: Optional[str]) -> Optional[str]:
    """The API key to require: ``--api-key``, else ``$CACHEFLOW_API_KEY``, else None (no
    authentication). A key that is empty or only whitespace (say, from an unset variable) is
    refused rather than meaning "no authentication"."""
    from cacheflow_runtime.errors import InvalidArgumentError

    source, key = "--api-key", given
    if key is None:
        source, key = f"${API_KEY_ENV}", os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise InvalidArgumentError(f"{source} is empty or whitespace; give a real key, or leave "
                                   "it out to serve without authentication", field="api_key",
                                   value=key)
    return key


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size and --distributed-executor-backend (serve and generate)."""
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="split the model over this many GPUs (or CPU processes)")
    parser.add_argument("--distributed-executor-backend", choices=["mp", "ray"], default=None,
                        help="who runs the ranks: one process per GPU on this host (mp, the "
                             "default) or Ray actors across the hosts of a Ray cluster")


def run_serve(args: argparse.Namespace) -> int:
    """Runs ``cacheflow serve`` until a signal stops it."""
    from cacheflow_runtime import AsyncLLMEngine
    from cacheflow_serve.llm import LLM
    from cacheflow_serve.server.launcher import make_server

    api_key = resolve_api_key(args.api_key)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(args.model, tokenizer=args.tokenizer,
              skip_tokenizer_init=args.skip_tokenizer_init, dtype=args.dtype,
              device=args.device, seed=args.seed,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              kv_cache_blocks=args.kv_cache_blocks, enforce_eager=args.enforce_eager,
              enable_prefix_caching=args.enable_prefix_caching,
              enable_chunked_prefill=args.enable_chunked_prefill,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_dtype=args.kv_cache_dtype,
              tensor_parallel_size=args.tensor_parallel_size,
              distributed_executor_backend=args.distributed_executor_backend)
    engine = AsyncLLMEngine(llm.engine, max_queued_requests=args.max_queued_requests)
    names = args.served_model_name or [str(args.model) if args.model else "SmolLM2-135M-Instruct"]
    server = make_server(engine, host=args.host, port=args.port, api_key=api_key,
                         served_model_names=names,
                         shutdown_grace_period=args.shutdown_grace_period,
                         log_level=args.log_level)
    try:
        server.run()
    finally:  # releases tensor-parallel workers at once (they also exit when we are gone)
        llm.engine.shutdown()
    return 0


