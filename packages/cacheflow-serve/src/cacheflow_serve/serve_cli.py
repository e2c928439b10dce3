"""The ``cacheflow serve`` subcommand: its options and how it starts the server (the heavy
imports happen only when it runs, so the other subcommands start fast)."""

from __future__ import annotations

import argparse
import logging


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cacheflow serve``."""
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every /v1 route")
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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step from Python (no CUDA graphs of decode steps)")
    add_parallel_arguments(parser)
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])


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

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              kv_cache_blocks=args.kv_cache_blocks, enforce_eager=args.enforce_eager,
              tensor_parallel_size=args.tensor_parallel_size,
              distributed_executor_backend=args.distributed_executor_backend)
    engine = AsyncLLMEngine(llm.engine, max_queued_requests=args.max_queued_requests)
    names = args.served_model_name or [str(args.model) if args.model else "SmolLM2-135M-Instruct"]
    server = make_server(engine, host=args.host, port=args.port, api_key=args.api_key,
                         served_model_names=names,
                         shutdown_grace_period=args.shutdown_grace_period,
                         log_level=args.log_level)
    try:
        server.run()
    finally:  # releases tensor-parallel workers at once (they also exit when we are gone)
        llm.engine.shutdown()
    return 0


