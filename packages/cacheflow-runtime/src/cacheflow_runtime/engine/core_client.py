"""EngineCoreClient: the async engine of a server whose ``LLMEngine`` runs in another process.

With :class:`~cacheflow_runtime.engine.async_llm_engine.AsyncLLMEngine` the engine steps in a
thread of the server's process, so HTTP parsing, JSON and SSE encoding and the event loop take
the GIL from the step loop. Here the engine runs in an *engine core* process
(engine/engine_core.py), spawned with the ``spawn`` method and built there by a picklable
factory, so the model and CUDA are initialised only in it (and a tensor-parallel engine spawns
its workers from it). The front end keeps the same surface as AsyncLLMEngine: ``add_request``
/ ``generate`` give a :class:`RequestStream` of cumulative ``RequestOutput``s, ``abort``,
``stats()``, ``shutdown(grace_period)``, ``max_queued_requests``, the errors.

Commands go down one pipe, batched per turn of the event loop and written without blocking it;
each step's outputs come back up another as one message of deltas, which are rebuilt into
cumulative outputs here (so the core never pickles a request's whole history). The event loop
reads the pipe itself (``add_reader``), so no thread of this process wakes up per step.

Failures: an add the engine refuses raises its ValueError from ``add_request``; a core that
raises while stepping, exits or is killed ends every open stream with EngineClosedError, and
``is_accepting`` turns False (``/health`` answers 503). A core that fails to start raises its
error from the constructor (or ``wait_ready``), with the core's traceback as the cause.
``shutdown`` / ``close`` stop the core and reap it; so does a finalizer when the client is
collected or the interpreter exits (before ``multiprocessing`` joins its children at exit), and
the core exits on its own when this process goes away.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import signal
import time
from typing import Any, Optional

import torch

from cacheflow_runtime.engine.async_llm_engine import (
    BaseAsyncEngine,
    EngineClosedError,
    EngineStats,
    RequestObserver,
)
from cacheflow_runtime.engine.detokenizer import Detokenizer
from cacheflow_runtime.engine.engine_core import (
    EngineFactory,
    FrameReader,
    OutputDecoder,
    frame,
    run_engine_core,
)
from cacheflow_runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_READ_SIZE = 1 << 20
_PIPE_SIZE = 1 << 20  # fewer stalls of a writer whose reader is busy (Linux; best effort)


class _RemoteTraceback(Exception):
    """The traceback of an error raised in the engine core process."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nin the engine core process:\n{self.text.rstrip()}"


class _Pipes:
    """The front end's ends of the two pipes, shared with the finalizer."""

    def __init__(self, commands: Any, outputs: Any) -> None:
        self.commands = commands  # write end of the command pipe (a Connection)
        self.outputs = outputs  # read end of the output pipe
        self.framing_intact = True  # no command frame half written
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.commands.close()
            self.outputs.close()


def _enlarge(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_SIZE)
    except (ImportError, OSError):
        pass


def _exit_description(code: Optional[int]) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def _reap(process: multiprocessing.process.BaseProcess, pipes: _Pipes,
          timeout: float = 5.0) -> None:
    """Asks the core to shut down (waiting up to ``timeout`` seconds), then closes the pipes
    and terminates and kills it."""
    asked = False
    if process.is_alive() and not pipes.closed and pipes.framing_intact:
        try:
            fd = pipes.commands.fileno()
            os.set_blocking(fd, False)
            message = frame(pickle.dumps([("shutdown",)]))
            asked = os.write(fd, message) == len(message)
        except OSError:
            pass
    process.join(timeout if asked else 0.0)
    if process.is_alive():
        # A serving core ignores SIGTERM while this process lives; the end of its command
        # pipe stops it (as if this process had gone). SIGTERM stops a core still starting.
        pipes.close()
        process.terminate()
        process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(2.0)
    pipes.close()


class EngineCoreClient(BaseAsyncEngine):
    """Streams each request's outputs from an ``LLMEngine`` that runs in an engine core process.

    ``factory``: a picklable zero-argument callable that the core process calls to build the
    engine; it returns ``(engine, info)``, ``info`` being any picklable value handed back as
    ``self.info`` (the serve package passes the model's generation defaults this way).
    ``tokenizer``: the front end's own tokenizer (the same files as the engine's), or None; it
    serves the server's tokenization and builds the text of the requests that need no text in
    the core (engine_core.front_end_text), so that the core's step loop spends no time on it.
    ``max_queued_requests`` and ``observer`` as for AsyncLLMEngine. ``torch_threads``: the
    core's torch intra-op threads (default: this process's ``torch.get_num_threads()``, which is
    what AsyncLLMEngine's engine thread would use).

    The constructor starts the core process and, with ``wait=True``, waits until its engine is
    built (raising its startup error). With ``wait=False`` it returns at once: do other work,
    then call :meth:`wait_ready`.
    """

    def __init__(self, factory: EngineFactory, *, tokenizer: Any = None,
                 max_queued_requests: Optional[int] = None,
                 observer: Optional[RequestObserver] = None, wait: bool = True,
                 torch_threads: Optional[int] = None,
                 name: str = "cacheflow-engine-core") -> None:
        super().__init__(max_queued_requests=max_queued_requests, observer=observer)
        self._tokenizer = tokenizer
        self.model_config: Any = None
        self.scheduler_config: Any = None
        self.cache_config: Any = None
        self.info: Any = None
        self.pid: Optional[int] = None
        self._ready = False
        self._closing = False  # a shutdown was asked: the core's exit is expected
        self._reader = FrameReader()
        self._early: list[bytes] = []  # messages read with the ready message
        self._outbox: list[tuple[Any, ...]] = []
        self._unsent = bytearray()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._decoder = OutputDecoder(tokenizer)
        ctx = multiprocessing.get_context("spawn")
        commands_in, commands_out = ctx.Pipe(duplex=False)
        outputs_in, outputs_out = ctx.Pipe(duplex=False)
        for conn in (commands_out, outputs_out):
            _enlarge(conn.fileno())
        # Not a daemon: a daemonic process may not start the tensor-parallel workers.
        self._process = ctx.Process(target=run_engine_core, name=name, daemon=False,
                                    args=(factory, commands_in, outputs_out, os.getpid(),
                                          torch_threads or torch.get_num_threads()))
        self._pipes = _Pipes(commands_out, outputs_in)
        try:
            self._process.start()
        finally:
            commands_in.close()
            outputs_out.close()
        self.pid = self._process.pid
        # Not weakref.finalize: at exit multiprocessing joins its children without a timeout,
        # and whether weakref's exit hook runs before that depends on the import order (atexit
        # is LIFO). A serving core waits for this process's "shutdown" (or the end of its pipe),
        # so that join would hang; multiprocessing runs its own finalizers (exitpriority >= 0)
        # first.
        self._finalizer = multiprocessing.util.Finalize(
            self, _reap, args=(self._process, self._pipes), exitpriority=10)
        if wait:
            self.wait_ready()

    @property
    def tokenizer(self) -> Any:
        """The front end's tokenizer (the engine's files), or None."""
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        """Sets the tokenizer; requests added from now on have their text built here (see
        engine_core.front_end_text) when it is not None."""
        self._tokenizer = tokenizer
        self._decoder.detokenizer = None if tokenizer is None else Detokenizer(tokenizer)

    # ----------------------------------------------------------------------------- startup
    def wait_ready(self, timeout: Optional[float] = None) -> Any:
        """Waits until the core's engine is built and returns ``info``. If the core fails to
        start, reaps it and raises its error (the core's traceback as ``__cause__``), or a
        RuntimeError when it died without one; TimeoutError after ``timeout`` seconds."""
        if self._ready:
            return self.info
        if self._pipes.closed:
            raise EngineClosedError("the engine core was closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                message = self._next_startup_message(deadline)
                if message[0] == "ready":
                    return self._on_ready(message[1])
                if message[0] == "failed":
                    self._raise_startup_error(message[1], message[2])
        except BaseException:
            self.close()
            raise

    def _next_startup_message(self, deadline: Optional[float]) -> tuple[Any, ...]:
        fd = self._pipes.outputs.fileno()
        while not self._early:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait([fd, self._process.sentinel], left)
            if not ready:
                raise TimeoutError(f"the engine core process (pid {self.pid}) was not ready "
                                   "in time")
            if fd in ready:
                data = os.read(fd, _READ_SIZE)
                if data:
                    self._early.extend(self._reader.feed(data))
                    continue
            self._process.join(5.0)
            raise RuntimeError(f"the engine core process (pid {self.pid}) "
                               f"{_exit_description(self._process.exitcode)} while starting")
        message: tuple[Any, ...] = pickle.loads(self._early.pop(0))
        return message

    def _on_ready(self, ready: dict[str, Any]) -> Any:
        self.model_config = ready["model_config"]
        self.scheduler_config = ready["scheduler_config"]
        self.cache_config = ready["cache_config"]
        self._stats = EngineStats(*ready["stats"])
        self.info = ready["info"]
        self._ready = True
        logger.info("engine core process ready (pid %d)", self.pid)
        return self.info

    def _raise_startup_error(self, error: BaseException, remote_traceback: str) -> None:
        self._process.join(5.0)
        if not isinstance(error, Exception):  # SystemExit from SIGTERM, ...
            raise RuntimeError(f"the engine core process (pid {self.pid}) was stopped while "
                               f"starting ({error!r})")
        raise error from _RemoteTraceback(remote_traceback)

    # ----------------------------------------------------------------------------- state
    @property
    def is_running(self) -> bool:
        """True while the core process runs and serves."""
        return self._ready and not self._pipes.closed and self._process.is_alive()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._pipes.closed:
            self._accepting = False
            return
        self.wait_ready()
        os.set_blocking(self._pipes.outputs.fileno(), False)
        os.set_blocking(self._pipes.commands.fileno(), False)
        loop.add_reader(self._pipes.outputs.fileno(), self._on_readable)
        for payload in self._early:
            loop.call_soon(self._handle, pickle.loads(payload), time.monotonic())
        self._early = []

    # ----------------------------------------------------------------------------- requests
    async def _add(self, request_id: str, prompt: Optional[str],
                   sampling_params: SamplingParams, prompt_token_ids: Optional[list[int]],
                   arrival: float) -> None:
        if self._error is not None or self._pipes.closed:
            raise EngineClosedError(self._closed_reason())
        assert self._loop is not None
        added: asyncio.Future[None] = self._loop.create_future()
        self._pending[request_id] = added
        core_params = self._decoder.add(request_id, prompt, prompt_token_ids, sampling_params)
        self._timing[request_id] = [arrival, arrival, 0]
        self._queue(("add", request_id, prompt, core_params, prompt_token_ids))
        await added

    def _send_abort(self, request_ids: list[str]) -> None:
        self._queue(("abort", list(request_ids)))

    def _queue(self, command: tuple[Any, ...]) -> None:
        """Sends ``command`` with the others of this turn of the loop, as one message."""
        if self._pipes.closed or self._loop is None:
            return
        self._outbox.append(command)
        if len(self._outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if not self._outbox:
            return
        commands, self._outbox = self._outbox, []
        self._write(frame(pickle.dumps(commands, protocol=pickle.HIGHEST_PROTOCOL)))

    def _write(self, data: bytes) -> None:
        if self._pipes.closed:
            return
        fd = self._pipes.commands.fileno()
        if self._unsent:
            self._unsent += data
            return
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the core is gone; reading its pipe tells why
            return
        if written < len(data):
            self._unsent += data[written:]
            self._pipes.framing_intact = False
            assert self._loop is not None
            self._loop.add_writer(fd, self._on_writable)

    def _on_writable(self) -> None:
        fd = self._pipes.commands.fileno()
        try:
            written = os.write(fd, self._unsent)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._unsent)
        del self._unsent[:written]
        if not self._unsent:
            self._pipes.framing_intact = True
            assert self._loop is not None
            self._loop.remove_writer(fd)

    # ----------------------------------------------------------------------------- outputs
    def _on_readable(self) -> None:
        try:
            data = os.read(self._pipes.outputs.fileno(), _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._on_exit()
            return
        now = time.monotonic()
        try:
            for payload in self._reader.feed(data):
                self._handle(pickle.loads(payload), now)
        except Exception as exc:  # a bug here would leave every stream hanging
            logger.exception("reading the engine core's outputs failed")
            self._die(exc)
            self.close()

    def _handle(self, message: tuple[Any, ...], now: float) -> None:
        kind = message[0]
        if kind == "out":
            _, deltas, stats = message
            self._stats = EngineStats(*stats)
            outputs = [self._decoder.decode(delta) for delta in deltas]
            self._observe(outputs, now)
            self._dispatch(outputs)
        elif kind == "stats":
            self._stats = EngineStats(*message[1])
        elif kind == "added":
            for request_id, error in message[1]:
                added = self._pending.pop(request_id, None)
                if error is not None:
                    self._decoder.forget(request_id)
                    self._timing.pop(request_id, None)
                if added is None or added.done():
                    continue
                if error is None:
                    added.set_result(None)
                else:
                    added.set_exception(error)
        elif kind == "died":
            _, error, remote_traceback = message
            logger.error("the engine core process (pid %d) died: %s", self.pid,
                         remote_traceback.rstrip())
            self._die(error)

    def _on_exit(self) -> None:
        """The core closed its pipe: it exited."""
        assert self._loop is not None
        self._loop.remove_reader(self._pipes.outputs.fileno())
        self._process.join(1.0)
        if self._closing:
            return
        if self._error is None:
            error = RuntimeError(f"the engine core process (pid {self.pid}) "
                                 f"{_exit_description(self._process.exitcode)}")
            logger.error("%s; failing every request", error)
            self._die(error)

    def _die(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        closed = EngineClosedError(self._closed_reason())
        for added in self._pending.values():
            if not added.done():
                added.set_exception(closed)
        self._pending.clear()
        self._timing.clear()
        self._decoder = OutputDecoder(self._tokenizer)
        self._fail_all(self._error)

    # ----------------------------------------------------------------------------- shutdown
    async def _stop(self, timeout: float) -> None:
        if self._pipes.closed:
            return
        self._closing = True
        if self._loop is not None and self._process.is_alive():
            self._queue(("shutdown",))
            self._flush()
            await asyncio.get_running_loop().run_in_executor(None, self._process.join,
                                                             timeout)
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stops the core process now: asks it to shut down, waits up to ``timeout`` seconds,
        then terminates it; reaps it and closes the pipes. Idempotent. For use where the event
        loop does not run (any more), or from the loop's thread; ``shutdown`` is the graceful
        way."""
        self._accepting = False
        self._closing = True
        loop = self._loop
        if loop is not None and not loop.is_closed() and not self._pipes.closed:
            loop.remove_reader(self._pipes.outputs.fileno())
            if self._unsent:
                loop.remove_writer(self._pipes.commands.fileno())
        self._unsent.clear()
        self._finalizer.cancel()
        _reap(self._process, self._pipes, timeout)
