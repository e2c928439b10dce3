"""The ``cacheflow serve`` subcommand: its options and how it starts the server (the heavy
imports happen only when it runs, so the other subcommands start fast)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from cacheflow_serve.engine_args import add_engine_arguments, llm_kwargs

if TYPE_CHECKING:
    from cacheflow_runtime import BaseAsyncEngine

API_KEY_ENV = "CACHEFLOW_API_KEY"
logger = logging.getLogger("cacheflow_serve.serve")


MAX_PORT = 65535


def _ranged(convert: Callable[[str], Any], ok: Callable[[Any], bool],
            wanted: str) -> Callable[[str], Any]:
    """An argparse type: the text converted by ``convert`` if ``ok`` accepts it, else a usage
    error saying it must be ``wanted``."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


# The argparse types of the serve flags that take numbers in a range.
_PORT = _ranged(int, lambda port: 0 <= port <= MAX_PORT, f"a port in [0, {MAX_PORT}]")
_COUNT = _ranged(int, lambda value: value >= 1, "an integer >= 1")
_SECONDS = _ranged(float, lambda value: math.isfinite(value) and value >= 0,
                   "a finite number of seconds >= 0")


def _json_strings(text: str) -> list[str]:
    """An argparse type: a JSON list of strings (vLLM's form of the CORS flags)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"must be a JSON list of strings, e.g. "
                                         f"'[\"https://example.com\"]', got {text!r}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cacheflow serve``."""
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=_PORT, default=8000,
                        help="port to listen on, 0 to 65535 (0: any free port; default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every /v1 route "
                             f"(default: ${API_KEY_ENV} if set)")
    parser.add_argument("--allowed-origins", type=_json_strings, default=["*"],
                        help="browser origins allowed to call the server, a JSON list "
                             "(default: [\"*\"])")
    parser.add_argument("--allowed-methods", type=_json_strings, default=["*"],
                        help="HTTP methods allowed to them, a JSON list (default: [\"*\"])")
    parser.add_argument("--allowed-headers", type=_json_strings, default=["*"],
                        help="request headers allowed to them, a JSON list (default: [\"*\"])")
    parser.add_argument("--allow-credentials", action="store_true",
                        help="let them send cookies and credentials (CORS)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) clients use (default: the model path)")
    parser.add_argument("--max-queued-requests", type=_COUNT, default=None,
                        help="answer 429 when this many requests wait for their first token")
    parser.add_argument("--shutdown-grace-period", type=_SECONDS, default=5.0,
                        help="seconds in-flight requests get to finish on SIGTERM or SIGINT "
                             "(default: 5)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                        help="chat template for chat requests and /tokenize messages: a file, "
                             "or a Jinja template written inline (default: the tokenizer's)")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="let a request's own chat_template replace the server's (refused "
                             "with 400 otherwise)")
    parser.add_argument("--disable-frontend-multiprocessing", action="store_true",
                        help="run the engine in a thread of the server's process instead of "
                             "an engine core process of its own (by default the HTTP front "
                             "end and the engine's step loop run in separate processes, so "
                             "they do not compete for one interpreter lock)")
    add_engine_arguments(parser)


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


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the model loads (as vLLM binds it), so that
    a port in use or a host this machine does not have is a one-line error at once, not after
    the engine has started; ValueError naming the address."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: "
                         f"{exc.strerror or exc} (--host / --port)") from None
    return sock


def _start_engine(args: argparse.Namespace
                  ) -> tuple[BaseAsyncEngine, dict[str, Any], Callable[[], None]]:
    """The engine the server runs on (in a process of its own unless
    ``--disable-frontend-multiprocessing``), its generation defaults and how to stop it."""
    if args.disable_frontend_multiprocessing:
        from cacheflow_runtime import AsyncLLMEngine
        from cacheflow_serve.engine_process import with_serving_batch_limits
        from cacheflow_serve.llm import LLM

        llm = LLM(args.model, **with_serving_batch_limits(llm_kwargs(args)))
        engine: BaseAsyncEngine = AsyncLLMEngine(llm.engine,
                                                 max_queued_requests=args.max_queued_requests)
        return engine, llm.generation_defaults, llm.engine.shutdown
    from cacheflow_serve.engine_process import start_engine_process

    client, defaults = start_engine_process(
        args.model, max_queued_requests=args.max_queued_requests, log_level=args.log_level,
        **llm_kwargs(args))
    return client, defaults, client.close


def run_serve(args: argparse.Namespace) -> int:
    """Runs ``cacheflow serve`` until a signal stops it."""
    # Only torch and the runtime come before the engine core starts: the server's other imports
    # (transformers, fastapi, uvicorn) overlap the core's start.
    from cacheflow_serve.chat_template import load_chat_template
    from cacheflow_serve.engine_process import LOG_FORMAT

    api_key = resolve_api_key(args.api_key)
    chat_template = load_chat_template(args.chat_template)
    sock = listen_socket(args.host, args.port)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        engine, defaults, close = _start_engine(args)
    except BaseException:
        sock.close()
        raise
    from cacheflow_serve.server.app import CorsPolicy
    from cacheflow_serve.server.launcher import make_server

    logger.info("model %s; sampling defaults from the generation config (%s) for fields a "
                "request leaves unset: %s", engine.model_config.model_path,
                getattr(args, "generation_config", "auto"),
                ", ".join(f"{k}={v}" for k, v in defaults.items()) or "none")
    names = args.served_model_name or [str(args.model) if args.model else "SmolLM2-135M-Instruct"]
    try:
        server = make_server(engine, host=args.host, port=args.port, api_key=api_key,
                             served_model_names=names,
                             shutdown_grace_period=args.shutdown_grace_period,
                             log_level=args.log_level, generation_defaults=defaults,
                             cors=CorsPolicy(tuple(args.allowed_origins),
                                             tuple(args.allowed_methods),
                                             tuple(args.allowed_headers),
                                             args.allow_credentials),
                             chat_template=chat_template,
                             trust_request_chat_template=args.trust_request_chat_template)
        # What lives as long as the server (model or tokenizer, imports) leaves the cyclic
        # garbage collector's scans: a full collection walks every tracked object and stalls
        # the engine's step while it does (host_overhead.py --gc-freeze: collection pauses per
        # step at batch 256 from about 3.4 to 0.9 ms on a 2-core CPU). The engine core process
        # does the same for its own heap.
        gc.collect()
        gc.freeze()
        server.run(sockets=[sock])
    finally:  # stops the engine core process or the tensor-parallel workers at once
        close()
        sock.close()
    if not server.started:
        return 1
    # The graceful shutdown is complete: exit now rather than spend seconds tearing down torch,
    # the model and the imports, which nothing needs (logs and output are flushed first).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
