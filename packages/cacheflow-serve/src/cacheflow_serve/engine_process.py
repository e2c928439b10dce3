"""The server's engine in a process of its own (``cacheflow serve``'s default).

:func:`start_engine_process` spawns the engine core process (cacheflow_runtime's
``EngineCoreClient``), which builds ``LLM(model, **options)`` there: the model, CUDA and any
tensor-parallel workers live in that process, never in the server's. The server's process loads
only the tokenizer (while the core loads the model) for its own tokenization and chat templates.
Importing this module imports the runtime (torch) but not transformers or the server, so that
``cacheflow serve`` starts the core before its own remaining imports.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Optional

from cacheflow_runtime import EngineCoreClient, LLMEngine

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(__name__)


def with_serving_batch_limits(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (LLM keywords) with the server's step budget where they leave it out: vLLM's
    serving default for the device (8,192 tokens on GPUs of 70 GiB or more, A100s aside; 2,048
    elsewhere), smaller than LLM's offline one so that a long prompt's chunks do not stretch
    the streams' inter-token latency. Without chunked prefill LLM's own rule applies."""
    from cacheflow_runtime.config import resolve_batch_limits, resolve_device

    given = options.get("max_num_batched_tokens")
    _, budget = resolve_batch_limits(resolve_device(options.get("device", "auto")),
                                     options.get("max_num_seqs"), given,
                                     options.get("enable_chunked_prefill", True), serving=True)
    return options if budget == given else {**options, "max_num_batched_tokens": budget}


def build_engine(model: Optional[str | Path], options: dict[str, Any],
                 log_level: Optional[str]) -> tuple[LLMEngine, dict[str, Any]]:
    """The engine core's factory (runs in the core process): the engine of
    ``LLM(model, **options)`` and ``{"generation_defaults": ...}`` of that LLM."""
    from cacheflow_serve.llm import LLM

    if log_level is not None:
        logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    llm = LLM(model, **with_serving_batch_limits(options))
    return llm.engine, {"generation_defaults": llm.generation_defaults}


def _load_tokenizer(model: Optional[str | Path], options: dict[str, Any]) -> Any:
    """The tokenizer LLM(model, **options) loads (None with skip_tokenizer_init)."""
    from cacheflow_models import default_model_path, load_tokenizer

    if options.get("skip_tokenizer_init"):
        return None
    source = options.get("tokenizer") or model or default_model_path()
    return load_tokenizer(Path(source))


def start_engine_process(model: Optional[str | Path] = None, *,
                         max_queued_requests: Optional[int] = None,
                         log_level: Optional[str] = None,
                         **options: Any) -> tuple[EngineCoreClient, dict[str, Any]]:
    """Starts an engine core process serving ``LLM(model, **options)``'s engine; returns its
    client (tokenizer attached, ``max_queued_requests`` as for AsyncLLMEngine) and the model's
    generation defaults, once the engine is built.

    Whatever ``LLM(...)`` raises in the core (a bad option, a missing checkpoint, out of
    memory) is raised here, with the core's traceback as its cause; the core is reaped first.
    ``log_level``: the core's logging level (None: leave its logging unconfigured).
    """
    factory = functools.partial(build_engine, model, dict(options), log_level)
    client = EngineCoreClient(factory, max_queued_requests=max_queued_requests, wait=False)
    try:
        tokenizer_error: Optional[Exception] = None
        try:  # while the core loads the model
            tokenizer = _load_tokenizer(model, options)
        except Exception as exc:  # the core's own error about it is the one to report
            tokenizer, tokenizer_error = None, exc
        info = client.wait_ready()
        if tokenizer_error is not None:
            raise tokenizer_error
    except BaseException:
        client.close()
        raise
    client.tokenizer = tokenizer
    return client, dict(info["generation_defaults"])
