"""AsyncLLMEngine: an ``LLMEngine`` stepped by one background thread, for asyncio servers.

The engine step is synchronous and CPU/GPU-bound, so it runs in a dedicated thread and the event
loop stays free to serve. The loop never touches the ``LLMEngine`` itself: adds and aborts are
queued as commands that the engine thread applies, under one lock, between steps. Outputs go
back to per-request streams through ``loop.call_soon_threadsafe``.

Life cycle of a request: ``await engine.add_request(...)`` validates it (ValueError for a bad
request, :class:`EngineOverloadedError` when ``max_queued_requests`` are already waiting,
:class:`EngineClosedError` while shutting down or after the engine died) and returns a
:class:`RequestStream`; iterating the stream yields cumulative ``RequestOutput``s until the
finished one. A consumer that stops iterating early (a break, a cancelled task, a closed
connection) aborts the request, which frees its KV blocks at the next step.

``shutdown(grace_period)`` stops accepting, lets in-flight requests run for up to
``grace_period`` seconds, aborts the rest (their streams still get a final output whose
finish_reason is "abort") and stops the thread.

What happens on the event loop (streams, admission, aborts, latencies, shutdown) is
:class:`BaseAsyncEngine`, shared with ``EngineCoreClient`` (engine/core_client.py), which runs
the engine in a process of its own instead of a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Optional, Protocol

import torch

from cacheflow_runtime.outputs import RequestOutput
from cacheflow_runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting to start; the caller should retry later (HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down, stopped, or died of an error (HTTP 503)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's queues, KV cache and token counters (taken after each step).

    ``prefix_cache_queries`` / ``prefix_cache_hits``: prompt tokens looked up in the prefix
    cache, and those found there, since the engine started.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_free_gpu_blocks: int = 0
    num_total_gpu_blocks: int = 0
    num_free_cpu_blocks: int = 0
    num_total_cpu_blocks: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def gpu_cache_usage(self) -> float:
        """Fraction of device KV blocks in use, in [0, 1]."""
        total = self.num_total_gpu_blocks
        return 1.0 - self.num_free_gpu_blocks / total if total else 0.0

    @property
    def cpu_cache_usage(self) -> float:
        """Fraction of host (swap) KV blocks in use, in [0, 1]."""
        total = self.num_total_cpu_blocks
        return 1.0 - self.num_free_cpu_blocks / total if total else 0.0


def collect_stats(engine: Any) -> EngineStats:
    """Reads an ``EngineStats`` from an ``LLMEngine`` (call it where nothing steps the engine)."""
    scheduler, blocks = engine.scheduler, engine.block_manager
    return EngineStats(
        num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
        num_swapped=len(scheduler.swapped),
        num_free_gpu_blocks=blocks.get_num_free_gpu_blocks(),
        num_total_gpu_blocks=blocks.num_total_gpu_blocks,
        num_free_cpu_blocks=blocks.get_num_free_cpu_blocks(),
        num_total_cpu_blocks=blocks.num_total_cpu_blocks,
        num_prompt_tokens=engine.num_prompt_tokens,
        num_generation_tokens=engine.num_generation_tokens,
        num_preemptions=scheduler.num_preemptions,
        prefix_cache_queries=blocks.prefix_cache_queries,
        prefix_cache_hits=blocks.prefix_cache_hits)


class RequestObserver(Protocol):
    """Receives per-request latencies, measured in the engine thread when outputs are made."""

    def observe_time_to_first_token(self, seconds: float) -> None:
        """Seconds from ``add_request`` to the first generated token."""

    def observe_inter_token_latency(self, seconds: float) -> None:
        """Seconds between two successive tokens of one request."""


class RequestStream:
    """The outputs of one request, in order; iterate it with ``async for``.

    Outputs are cumulative (each holds all text and tokens so far), so when the consumer falls
    behind, the intermediate ones are skipped and only the latest is yielded. Leaving the loop
    before the finished output aborts the request.
    """

    def __init__(self, request_id: str, on_abandon: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.finished = False
        self._on_abandon = on_abandon
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hands over an output or the error that ends the stream (loop thread only)."""
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        """Ends the stream without a final output (the request was abandoned)."""
        self.finished = True
        self._ready.set()

    async def _next(self) -> Optional[RequestOutput]:
        while not self._items:
            if self.finished:
                return None
            self._ready.clear()
            await self._ready.wait()
        error = next((i for i in self._items if isinstance(i, BaseException)), None)
        if error is not None:
            self._items.clear()
            self.finished = True
            raise error
        latest = self._items[-1]
        self._items.clear()
        assert isinstance(latest, RequestOutput)
        if latest.finished:
            self.finished = True
        return latest

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                output = await self._next()
                if output is None:
                    return
                yield output
        finally:
            if not self.finished:
                self.abort()

    def abort(self) -> None:
        """Aborts the request (if it is still running) and drops its further outputs."""
        if not self.finished:
            self.finished = True
            self._on_abandon(self.request_id)


class BaseAsyncEngine(ABC):
    """What every async engine does on the event loop: request streams, admission
    (``max_queued_requests``), aborts, latency observation and the graceful shutdown.

    Subclasses say where the ``LLMEngine`` runs: :class:`AsyncLLMEngine` steps it in a thread
    of this process, ``EngineCoreClient`` (engine/core_client.py) in a process of its own. They
    implement ``_bind`` (start on the loop), ``_add`` (hand a request to the engine and wait
    until it is accepted or refused), ``_send_abort`` and ``_stop`` (stop the engine once
    nothing is left to run), and hand every step's outputs to ``_dispatch`` on the loop.

    A request's id may be used again as soon as its stream is done, aborted ones included: the
    engine then gets the new request under an id of its own while the aborted one's last
    output is on its way (``_engine_ids``), and the stream sees the caller's id.
    """

    # What a server reads about the engine (each subclass provides them).
    model_config: Any  # the engine's ModelConfig
    scheduler_config: Any  # the engine's SchedulerConfig (max_model_len, ...)
    tokenizer: Any  # the tokenizer for the server's own use (None or TokenIdsOnly: none)

    def __init__(self, *, max_queued_requests: Optional[int] = None,
                 observer: Optional[RequestObserver] = None) -> None:
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1 or None, "
                             f"got {max_queued_requests!r}")
        self.max_queued_requests = max_queued_requests
        self.observer = observer
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._streams: dict[str, RequestStream] = {}
        # the caller's request id <-> the engine's, for the requests with a stream; ids the
        # engine still runs as aborted (their final output not seen yet)
        self._engine_ids: dict[str, str] = {}
        self._caller_ids: dict[str, str] = {}
        self._aborting: set[str] = set()
        self._renames = itertools.count(1)
        self._unstarted: set[str] = set()
        self._drained = asyncio.Event()
        self._accepting = True
        self._error: Optional[BaseException] = None
        self._shutdown_task: Optional[asyncio.Task[None]] = None
        # request id -> [arrival, time of the last new token, tokens seen]; touched only by
        # the thread that makes outputs (``_observe``).
        self._timing: dict[str, list[float]] = {}
        self.num_abandoned = 0  # requests aborted before they finished (consumer went away)
        self._stats = EngineStats()

    # ----------------------------------------------------------------------------- state
    @property
    @abstractmethod
    def is_running(self) -> bool:
        """True while the engine runs (its thread or process)."""

    @property
    def is_accepting(self) -> bool:
        """True while new requests are taken (not shutting down, not dead)."""
        return self._accepting and self._error is None

    @property
    def error(self) -> Optional[BaseException]:
        """The exception that stopped the engine, if any."""
        return self._error

    @property
    def num_in_flight(self) -> int:
        """Requests added and not yet finished or abandoned."""
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The latest snapshot of the engine's state (taken after each step)."""
        return self._stats

    # ----------------------------------------------------------------------------- start
    def start(self) -> None:
        """Binds the engine to the running event loop and starts it (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            if self._loop is not loop:
                raise RuntimeError(f"the {type(self).__name__} is already bound to another "
                                   "event loop")
            return
        self._loop = loop
        self._drained = asyncio.Event()
        self._drained.set()
        self._bind(loop)

    @abstractmethod
    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attaches the engine to the event loop it serves (once, at the first use)."""

    # ----------------------------------------------------------------------------- requests
    async def add_request(self, request_id: str, prompt: Optional[str],
                          sampling_params: SamplingParams,
                          prompt_token_ids: Optional[list[int]] = None) -> RequestStream:
        """Adds a request and returns its output stream.

        Raises ValueError if the engine rejects the request, :class:`EngineOverloadedError` when
        ``max_queued_requests`` requests already wait, :class:`EngineClosedError` when the
        engine does not accept requests.
        """
        self.start()
        if not self.is_accepting:
            raise EngineClosedError(self._closed_reason())
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        limit = self.max_queued_requests
        if limit is not None and len(self._unstarted) >= limit:
            raise EngineOverloadedError(f"{len(self._unstarted)} requests are already waiting "
                                        f"(max_queued_requests={limit}); retry later")
        stream = RequestStream(request_id, self.abort)
        self._streams[request_id] = stream
        engine_id = request_id
        while engine_id in self._aborting or engine_id in self._caller_ids:
            engine_id = f"{request_id}#{next(self._renames)}"
        self._engine_ids[request_id] = engine_id
        self._caller_ids[engine_id] = request_id
        self._unstarted.add(request_id)
        self._drained.clear()
        try:
            await self._add(engine_id, prompt, sampling_params, prompt_token_ids,
                            time.monotonic())
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._forget(request_id)
            raise
        return stream

    @abstractmethod
    async def _add(self, request_id: str, prompt: Optional[str],
                   sampling_params: SamplingParams, prompt_token_ids: Optional[list[int]],
                   arrival: float) -> None:
        """Hands the request to the engine; returns once it is queued there, raises what the
        engine raised if it refused it (EngineClosedError if the engine died first)."""

    async def generate(self, request_id: str, prompt: Optional[str],
                       sampling_params: SamplingParams,
                       prompt_token_ids: Optional[list[int]] = None
                       ) -> AsyncIterator[RequestOutput]:
        """Adds a request and yields its outputs; closing the generator early aborts it."""
        stream = await self.add_request(request_id, prompt, sampling_params, prompt_token_ids)
        async for output in stream:
            yield output

    def abort(self, request_id: str) -> None:
        """Aborts a request from the loop thread; its stream gets nothing more."""
        engine_id = self._engine_ids.get(request_id, request_id)
        if request_id in self._streams:
            self.num_abandoned += 1
            self._aborting.add(engine_id)
        self._forget(request_id)
        self._send_abort([engine_id])

    @abstractmethod
    def _send_abort(self, request_ids: list[str]) -> None:
        """Asks the engine to abort ``request_ids`` (their final outputs still come)."""

    def _forget(self, request_id: str) -> None:
        engine_id = self._engine_ids.pop(request_id, None)
        if engine_id is not None:
            self._caller_ids.pop(engine_id, None)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.close()
        self._unstarted.discard(request_id)
        if not self._streams:
            self._drained.set()

    # ----------------------------------------------------------------------------- shutdown
    async def shutdown(self, grace_period: float = 0.0, abort_timeout: float = 5.0) -> None:
        """Stops accepting requests, gives in-flight ones ``grace_period`` seconds to finish,
        aborts the rest (their streams end with a finish_reason "abort" output) and stops the
        engine. Safe to call more than once; later calls wait for the first."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(
                self._shutdown(grace_period, abort_timeout))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, grace_period: float, abort_timeout: float) -> None:
        self._accepting = False
        if self._loop is not None:
            if self._streams and grace_period > 0:
                await _wait_event(self._drained, grace_period)
            if self._streams:
                ids = [self._engine_ids.get(rid, rid) for rid in self._streams]
                logger.info("shutdown: aborting %d in-flight requests", len(ids))
                self._send_abort(ids)
                await _wait_event(self._drained, abort_timeout)
        await self._stop(abort_timeout)
        for request_id in list(self._streams):  # only if the engine hung
            self._streams[request_id].put(EngineClosedError("the engine was shut down"))
            self._forget(request_id)

    @abstractmethod
    async def _stop(self, timeout: float) -> None:
        """Stops the engine (waiting up to ``timeout`` seconds for it)."""

    def _closed_reason(self) -> str:
        if self._error is not None:
            return f"the engine stopped after an error: {self._error!r}"
        return "the engine is shutting down"

    # ----------------------------------------------------------------------------- outputs
    def _observe(self, outputs: list[RequestOutput], now: float) -> None:
        """Feeds the observer the time to first token and inter-token latencies of
        ``outputs`` (made at ``now``); requests without a ``_timing`` entry are skipped."""
        for out in outputs:
            timing = self._timing.get(out.request_id)
            if timing is None:
                continue
            num_tokens = max((len(c.token_ids) for c in out.outputs), default=0)
            arrival, last, seen = timing
            if num_tokens > seen and self.observer is not None:
                if seen == 0:
                    self.observer.observe_time_to_first_token(now - arrival)
                else:
                    gap = (now - last) / (num_tokens - seen)
                    for _ in range(int(num_tokens - seen)):
                        self.observer.observe_inter_token_latency(gap)
            if num_tokens > seen:
                timing[1], timing[2] = now, num_tokens
            if out.finished:
                del self._timing[out.request_id]

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hands one step's outputs to their streams (loop thread)."""
        for out in outputs:
            engine_id = out.request_id
            request_id = self._caller_ids.get(engine_id)
            if request_id is None:  # abandoned: its final output frees the id for the engine
                if out.finished:
                    self._aborting.discard(engine_id)
                continue
            self._unstarted.discard(request_id)
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            stream.put(out if engine_id == request_id else replace(out, request_id=request_id))
            if out.finished:
                self._forget_finished(request_id, engine_id)
        if not self._streams:
            self._drained.set()

    def _forget_finished(self, request_id: str, engine_id: str) -> None:
        del self._streams[request_id]
        del self._engine_ids[request_id]
        del self._caller_ids[engine_id]

    def _fail_all(self, exc: BaseException) -> None:
        """Ends every open stream with an EngineClosedError naming ``exc`` (loop thread)."""
        error = EngineClosedError(f"the engine stopped after an error: {exc!r}")
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._engine_ids.clear()
        self._caller_ids.clear()
        self._unstarted.clear()
        self._drained.set()


class AsyncLLMEngine(BaseAsyncEngine):
    """Runs ``engine`` in a background thread and streams each request's outputs.

    ``max_queued_requests`` bounds how many requests may wait for their first token at once
    (None: no bound); past it ``add_request`` raises :class:`EngineOverloadedError`.
    ``observer`` receives time-to-first-token and inter-token latencies. Only the engine
    thread steps ``engine``; anything else that touches it must hold ``engine_lock``.
    """

    def __init__(self, engine: Any, *, max_queued_requests: Optional[int] = None,
                 observer: Optional[RequestObserver] = None) -> None:
        super().__init__(max_queued_requests=max_queued_requests, observer=observer)
        self.engine = engine
        # Held by the engine thread around every LLMEngine access; hold it to touch the
        # LLMEngine from any other thread.
        self.engine_lock = threading.Lock()
        self._wakeup = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stop_thread = False
        self._thread: Optional[threading.Thread] = None
        self._pending_adds: set[concurrent.futures.Future[None]] = set()
        self._stats = collect_stats(engine)

    # ----------------------------------------------------------------------------- state
    @property
    def is_running(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def model_config(self) -> Any:
        """The engine's ``ModelConfig``."""
        return self.engine.model_config

    @property
    def scheduler_config(self) -> Any:
        """The engine's ``SchedulerConfig``."""
        return self.engine.scheduler_config

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer (``TokenIdsOnly`` or None when it has none)."""
        return self.engine.tokenizer

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._thread = threading.Thread(target=self._run, name="cacheflow-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- requests
    async def _add(self, request_id: str, prompt: Optional[str],
                   sampling_params: SamplingParams, prompt_token_ids: Optional[list[int]],
                   arrival: float) -> None:
        added: concurrent.futures.Future[None] = concurrent.futures.Future()

        def apply() -> None:
            if not added.set_running_or_notify_cancel():
                return
            try:
                self.engine.add_request(request_id, prompt, sampling_params, prompt_token_ids)
            except BaseException as exc:  # handed to the caller
                added.set_exception(exc)
            else:
                self._timing[request_id] = [arrival, arrival, 0]
                added.set_result(None)

        self._pending_adds.add(added)
        added.add_done_callback(self._pending_adds.discard)
        self._submit(apply)
        if self._error is not None:  # the engine thread died before it could take the add
            _fail_future(added, EngineClosedError(self._closed_reason()))
        await asyncio.wrap_future(added)

    def _send_abort(self, request_ids: list[str]) -> None:
        self._submit(lambda: self.engine.abort_request(request_ids))

    def _submit(self, command: Callable[[], None]) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    async def _stop(self, timeout: float) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._wakeup:
            self._stop_thread = True
            self._wakeup.notify()
        await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)

    # ----------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop_steps()
        except BaseException as exc:  # the engine is unusable now; tell every stream
            logger.exception("the engine thread died")
            self._error = exc
            for future in list(self._pending_adds):  # adds it will never apply
                _fail_future(future, EngineClosedError(self._closed_reason()))
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._fail_all, exc)
            except RuntimeError:  # the loop is closed
                pass

    def _loop_steps(self) -> None:
        busy = False
        while True:
            with self._wakeup:
                while not self._commands and not busy and not self._stop_thread:
                    self._wakeup.wait()
                if self._stop_thread and not self._commands:
                    return
                commands, self._commands = self._commands, []
            with self.engine_lock:
                for command in commands:
                    command()
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                busy = self.engine.has_unfinished_requests()
                self._stats = collect_stats(self.engine)
            if outputs:
                self._observe(outputs, time.monotonic())
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._dispatch, outputs)


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


def _fail_future(future: concurrent.futures.Future[None], exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except concurrent.futures.InvalidStateError:  # already done or cancelled
        pass
