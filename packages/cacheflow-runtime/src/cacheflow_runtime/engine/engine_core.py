"""The engine core process: an ``LLMEngine`` stepped in a process of its own, and its wire format.

``EngineCoreClient`` (engine/core_client.py) spawns :func:`run_engine_core` with two pipes. The
core builds its engine from a picklable factory (so the model and CUDA are initialised there,
never in the front end), reports ``("ready", info)`` or ``("failed", error, traceback)``, then
loops: apply the commands that came in (``add``, ``abort``, ``shutdown``), run one step, hand
the step's outputs to a sender thread, which encodes and writes them as one message while the
loop goes on. It blocks on the command pipe only while it has nothing to run, and exits when
the front end goes away (its end of the command pipe closes). Once ready, it ignores SIGTERM
while the front end lives (a SIGTERM to the process group must not cut the front end's drain
short): it stops on ``shutdown``, on the end of the command pipe, or when orphaned.

Messages are pickled lists or tuples, framed by an 8-byte length (:func:`write_frame`,
:class:`FrameReader`). From the front end: one list of commands per message,
``("add", request_id, prompt, sampling_params, prompt_token_ids)``, ``("abort", [ids])``,
``("shutdown",)``. From the core: ``("added", [(request_id, error or None), ...])`` right
after the commands are applied, ``("out", [delta, ...], stats)`` after each step that made
outputs, ``("stats", stats)`` when only the engine's state changed, ``("died", error,
traceback)`` when stepping raised.

Outputs travel as deltas (:class:`OutputEncoder` / :class:`OutputDecoder`): a request's
``RequestOutput`` is cumulative, so sending it whole each step would cost O(tokens so far) in
pickling on the core's critical path. A delta carries only the new text, token ids and
logprobs of each sequence; the front end appends them to what it has and rebuilds the same
``RequestOutput``. Requests whose sequences may be reordered or replaced (``best_of > n``,
beam search) send their sequences whole.

Detokenization happens in the front end where it can (:func:`front_end_text`): a request
without stop strings whose sequences only grow goes to the core with ``detokenize=False``, and
the front end's :class:`OutputDecoder` turns its token ids into the text the core would have
made, so the core's step loop spends no time on it. The core detokenizes the others (it stops
a sequence on a stop string in its text, and ranks or replaces whole sequences).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pickle
import queue
import select
import signal
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Optional

import torch

from cacheflow_runtime.engine.async_llm_engine import EngineStats, collect_stats
from cacheflow_runtime.engine.detokenizer import Detokenizer
from cacheflow_runtime.outputs import CompletionOutput, RequestOutput
from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.sequence import Sequence

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
_READ_SIZE = 1 << 20
_PARENT_CHECK_S = 0.5

#: ``factory()`` -> ``(engine, info)``: builds the LLMEngine in the core process; ``info`` (any
#: picklable value) is handed to the front end with the ready message.
EngineFactory = Callable[[], tuple[Any, Any]]


# --------------------------------------------------------------------------------- framing
def frame(payload: bytes) -> bytes:
    """``payload`` with its length header."""
    return _HEADER.pack(len(payload)) + payload


def write_frame(fd: int, payload: bytes) -> None:
    """Writes one framed message to the blocking file descriptor ``fd``."""
    view = memoryview(frame(payload))
    while view:
        view = view[os.write(fd, view):]


class FrameReader:
    """Splits a byte stream into the payloads of the frames it carries."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Adds ``data``; returns the payloads of the frames now complete."""
        buffer = self._buffer
        buffer += data
        payloads = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + size
            if end > len(buffer):
                break
            payloads.append(bytes(buffer[start + _HEADER.size:end]))
            start = end
        if start:
            del buffer[:start]
        return payloads


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError (ValueError for a ValueError)
    carrying its type name and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        kind = ValueError if isinstance(exc, ValueError) else RuntimeError
        return kind(f"{type(exc).__name__}: {exc}")


def stats_tuple(stats: EngineStats) -> tuple[Any, ...]:
    """``stats`` as a plain tuple (cheaper to pickle than the dataclass)."""
    return tuple(stats.__dict__.values())


# --------------------------------------------------------------------------------- deltas
@dataclass
class _Sent:
    """What the front end already has of one request (core side)."""

    whole: bool  # its sequences may be reordered or replaced: send them whole
    send_prompt: bool  # the prompt was given as text: send its token ids once
    num_prompt_logprobs: int = 0
    # per sequence index: (text, number of token ids, number of logprobs, last token id)
    sequences: list[tuple[str, int, int, int]] = field(default_factory=list)


class OutputEncoder:
    """Turns each step's ``RequestOutput``s into deltas against what was sent before.

    A delta is ``(request_id, finished, num_cached_tokens, num_sequences, prompt,
    prompt_logprobs, sequences, arrival_time, first_token_time)``: ``prompt`` is ``(text, token
    ids)`` the first time for a request added without token ids, else None; ``prompt_logprobs``
    is ``(keep, new)`` or None;
    each sequence is ``(index, text_keep, new_text, tokens_keep, new_token_ids, logprobs_keep,
    new_logprobs or None, cumulative_logprob, finish_reason, stop_reason)``, where ``*_keep`` is
    how much of what the front end has stays before the new part is appended.
    """

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def add(self, request_id: str, params: SamplingParams, has_token_ids: bool) -> None:
        """Starts tracking a request the engine accepted."""
        whole = params.use_beam_search or params.best_of > params.n
        self._sent[request_id] = _Sent(whole=whole, send_prompt=not has_token_ids)

    def encode(self, outputs: list[RequestOutput]) -> list[tuple[Any, ...]]:
        """The deltas of one step's outputs (forgets the requests that finished)."""
        return [self._delta(out) for out in outputs]

    def _delta(self, out: RequestOutput) -> tuple[Any, ...]:
        sent = self._sent.get(out.request_id)
        if sent is None:  # not added through this core (cannot happen): send it whole
            sent = _Sent(whole=True, send_prompt=True)
        prompt = None
        if sent.send_prompt:
            prompt = (out.prompt, out.prompt_token_ids)
            sent.send_prompt = False
        prompt_logprobs = None
        if out.prompt_logprobs is not None and len(out.prompt_logprobs) != \
                sent.num_prompt_logprobs:
            keep = min(sent.num_prompt_logprobs, len(out.prompt_logprobs))
            prompt_logprobs = (keep, out.prompt_logprobs[keep:])
            sent.num_prompt_logprobs = len(out.prompt_logprobs)
        sequences = []
        known = sent.sequences
        for seq in out.outputs:
            i = seq.index
            text, tokens, logprobs = seq.text, seq.token_ids, seq.logprobs
            text_keep = tokens_keep = logprobs_keep = 0
            if not sent.whole and i < len(known):
                old_text, old_tokens, old_logprobs, last = known[i]
                if text.startswith(old_text):
                    text_keep = len(old_text)
                # A sequence's token ids only grow; checked cheaply all the same.
                if old_tokens <= len(tokens) and (old_tokens == 0
                                                  or tokens[old_tokens - 1] == last):
                    tokens_keep = old_tokens
                    if logprobs is not None and old_logprobs <= len(logprobs):
                        logprobs_keep = old_logprobs
            sequences.append((i, text_keep, text[text_keep:], tokens_keep,
                              tokens[tokens_keep:], logprobs_keep,
                              None if logprobs is None else logprobs[logprobs_keep:],
                              seq.cumulative_logprob, seq.finish_reason, seq.stop_reason))
            record = (text, len(tokens), len(logprobs or ()), tokens[-1] if tokens else -1)
            if i < len(known):
                known[i] = record
            else:
                known.extend([("", 0, 0, -1)] * (i - len(known)))
                known.append(record)
        if out.finished:
            self._sent.pop(out.request_id, None)
        return (out.request_id, out.finished, out.num_cached_tokens, len(out.outputs), prompt,
                prompt_logprobs, sequences, out.arrival_time, out.first_token_time)


def front_end_text(params: SamplingParams) -> bool:
    """Whether a front end with the engine's tokenizer builds the text of a request with
    ``params`` itself (sending it to the core with ``detokenize=False``): it wants text, has no
    stop strings (the core stops a sequence on its text) and its sequences only grow (no beam
    search, ``best_of == n``: the core sends the others whole)."""
    return (params.detokenize and not params.stop_strings and not params.use_beam_search
            and params.best_of == params.n)


class _Sequence:
    """One sequence as the front end rebuilds it; ``text_state`` holds the detokenizer's state
    when the front end builds its text."""

    __slots__ = ("text", "token_ids", "logprobs", "cumulative_logprob", "finish_reason",
                 "stop_reason", "text_state")

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[Any]] = None
        self.cumulative_logprob = 0.0
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[int | str] = None
        self.text_state: Optional[Sequence] = None


class _Request:
    __slots__ = ("prompt", "prompt_token_ids", "prompt_logprobs", "sequences",
                 "skip_special_tokens", "include_stop_token")

    def __init__(self, prompt: Optional[str], prompt_token_ids: Optional[list[int]],
                 skip_special_tokens: Optional[bool] = None,
                 include_stop_token: bool = False) -> None:
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs: Optional[list[Any]] = None
        self.sequences: list[_Sequence] = []
        # Not None when the front end builds the text (with this skip_special_tokens).
        self.skip_special_tokens = skip_special_tokens
        # include_stop_str_in_output: whether that text keeps a stopping EOS or stop token id.
        self.include_stop_token = include_stop_token


class OutputDecoder:
    """Rebuilds cumulative ``RequestOutput``s from the deltas of :class:`OutputEncoder`, and the
    text of the requests the front end detokenizes (with ``tokenizer``, the engine's)."""

    def __init__(self, tokenizer: Any = None) -> None:
        self._requests: dict[str, _Request] = {}
        self.detokenizer = None if tokenizer is None else Detokenizer(tokenizer)

    def add(self, request_id: str, prompt: Optional[str],
            prompt_token_ids: Optional[list[int]], params: Optional[SamplingParams] = None
            ) -> SamplingParams | None:
        """Starts a request (its token ids come with its first delta when None here). Returns
        the sampling parameters to send to the core: ``params``, or a copy with
        ``detokenize=False`` when this decoder builds the text (see :func:`front_end_text`)."""
        skip, include_stop_token = None, False
        if params is not None and self.detokenizer is not None and front_end_text(params):
            skip = params.skip_special_tokens
            include_stop_token = params.include_stop_str_in_output
            params = dataclasses.replace(params, detokenize=False)
        self._requests[request_id] = _Request(
            prompt, None if prompt_token_ids is None else list(prompt_token_ids), skip,
            include_stop_token)
        return params

    def forget(self, request_id: str) -> None:
        """Drops a request that will send nothing (the engine refused it)."""
        self._requests.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    def decode(self, delta: tuple[Any, ...]) -> RequestOutput:
        """Applies one delta and returns the request's cumulative output."""
        (request_id, finished, num_cached_tokens, num_sequences, prompt, prompt_logprobs,
         sequences, arrival_time, first_token_time) = delta
        req = self._requests.get(request_id)
        if req is None:
            req = self._requests[request_id] = _Request(None, None)
        if prompt is not None:
            req.prompt, req.prompt_token_ids = prompt
        if prompt_logprobs is not None:
            keep, new = prompt_logprobs
            if req.prompt_logprobs is None:
                req.prompt_logprobs = []
            del req.prompt_logprobs[keep:]
            req.prompt_logprobs.extend(new)
        seqs = req.sequences
        while len(seqs) < num_sequences:
            seqs.append(_Sequence())
        del seqs[num_sequences:]
        for (i, text_keep, text, tokens_keep, tokens, logprobs_keep, logprobs, cumulative,
             finish_reason, stop_reason) in sequences:
            seq = seqs[i]
            seq.text = (seq.text if text_keep == len(seq.text) else seq.text[:text_keep]) + text
            replaced = tokens_keep != len(seq.token_ids)
            del seq.token_ids[tokens_keep:]
            seq.token_ids.extend(tokens)
            if logprobs is None:
                seq.logprobs = None
            else:
                if seq.logprobs is None:
                    seq.logprobs = []
                del seq.logprobs[logprobs_keep:]
                seq.logprobs.extend(logprobs)
            seq.cumulative_logprob = cumulative
            seq.finish_reason = finish_reason
            seq.stop_reason = stop_reason
            if req.skip_special_tokens is not None:
                self._build_text(req, seq, seq.token_ids if replaced else tokens, replaced)
        if finished:
            del self._requests[request_id]
        return RequestOutput(
            request_id=request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids or [],
            prompt_logprobs=None if req.prompt_logprobs is None else list(req.prompt_logprobs),
            outputs=[CompletionOutput(index=i, text=s.text, token_ids=list(s.token_ids),
                                      cumulative_logprob=s.cumulative_logprob,
                                      logprobs=None if s.logprobs is None else list(s.logprobs),
                                      finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                     for i, s in enumerate(seqs)],
            finished=finished, num_cached_tokens=num_cached_tokens, arrival_time=arrival_time,
            first_token_time=first_token_time)

    def _build_text(self, req: _Request, seq: _Sequence, new_tokens: list[int],
                    restart: bool) -> None:
        """Brings ``seq.text`` up to its token ids as the core's detokenizer would (streamed
        token by token, the bytes of an unfinished character held back until the sequence
        finishes, for good when it is aborted); ``restart``: its earlier tokens changed, decode
        them all again."""
        detokenizer = self.detokenizer
        assert detokenizer is not None and req.skip_special_tokens is not None
        state = seq.text_state
        if state is None or restart:
            state = seq.text_state = Sequence(0, None, req.prompt_token_ids or [], block_size=1)
        for token_id in new_tokens:
            state.append_token(token_id, {token_id: 0.0})
        # stopped by the EOS or a stop token id (no stop strings here): core.stop.hides_stop_token
        state.stop_token_hidden = (seq.finish_reason == "stop" and not req.include_stop_token
                                   and not isinstance(seq.stop_reason, str))
        if new_tokens:
            detokenizer.decode_new_text(state, req.skip_special_tokens)
        if seq.finish_reason is not None and seq.finish_reason != "abort":
            detokenizer.flush_text(state)  # an aborted stream's text is what it showed
        seq.text = state.output_text


# --------------------------------------------------------------------------------- the core
class _ParentGone(Exception):
    """The front end closed its end of the command pipe or exited."""


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    raise SystemExit(128 + signum)


def _parent_alive(parent_pid: int) -> bool:
    """Whether the front end that spawned this process still runs (an orphan is reparented)."""
    return os.getppid() == parent_pid


def _ignore_sigterm_while_parent_lives(parent_pid: int) -> None:
    """Installs the SIGTERM handler of a serving core: SIGTERM stops it only once its front end
    is gone. A SIGTERM sent to the whole process group (systemd's KillMode=control-group,
    ``kill -- -PGID``) also reaches the front end, which drains the in-flight requests for its
    grace period and then says ``shutdown``; dying here would cut that drain short."""

    def on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
        if _parent_alive(parent_pid):
            logger.info("SIGTERM: the front end (pid %d) drives the shutdown", parent_pid)
            return
        _terminate(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    if not _parent_alive(parent_pid):  # it went away before the handler was in place
        raise _ParentGone()


def run_engine_core(factory: EngineFactory, commands_fd: Any, outputs_fd: Any,
                    parent_pid: int, torch_threads: int) -> None:
    """The core process's main: builds the engine, then serves the front end until it says
    ``shutdown`` or goes away. ``commands_fd`` / ``outputs_fd``: the read end of the command
    pipe and the write end of the output pipe (``multiprocessing`` connections, used only for
    their file descriptors); ``torch_threads``: torch's intra-op threads here. Ends the process
    (``os._exit``) once the engine is shut down."""
    torch.set_num_threads(torch_threads)
    # A Ctrl-C in a terminal reaches the whole process group; the front end drives the
    # shutdown (and aborts the in-flight requests first). While the engine is being built,
    # SIGTERM stops the core at once (there is nothing to drain); once it serves, SIGTERM is
    # left to the front end (see _ignore_sigterm_while_parent_lives).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    out_fd = outputs_fd.fileno()
    code = 0
    try:
        engine, info = factory()
    except BaseException as exc:
        logger.debug("the engine core failed to start", exc_info=True)
        _send_quietly(out_fd, ("failed", portable_error(exc), traceback.format_exc()))
        _exit(1)
    core: Optional[_EngineCore] = None
    try:
        # What lives as long as the engine leaves the cyclic collector's scans (see serve_cli).
        gc.collect()
        gc.freeze()
        _ignore_sigterm_while_parent_lives(parent_pid)
        ready = {"pid": os.getpid(), "model_config": getattr(engine, "model_config", None),
                 "scheduler_config": getattr(engine, "scheduler_config", None),
                 "cache_config": getattr(engine, "cache_config", None),
                 "stats": stats_tuple(collect_stats(engine)), "info": info}
        write_frame(out_fd, pickle.dumps(("ready", ready), protocol=pickle.HIGHEST_PROTOCOL))
        core = _EngineCore(engine, commands_fd.fileno(), out_fd, parent_pid)
        core.run()
        core.finish()
    except _ParentGone:
        logger.info("the front end went away; the engine core stops")
    except BaseException as exc:
        code = 1
        if isinstance(exc, SystemExit):  # SIGTERM while starting or orphaned (_terminate)
            code = exc.code if isinstance(exc.code, int) else 1
            error: BaseException = RuntimeError(f"the engine core process (pid {os.getpid()}) "
                                                "was terminated")
        else:
            logger.exception("the engine core died")
            error = portable_error(exc)
        message = ("died", error, traceback.format_exc())
        if core is None:
            _send_quietly(out_fd, message)
        elif not core.finish(message) and not core._sender.is_alive():
            _send_quietly(out_fd, message)  # the sender failed: nothing else writes now
    finally:
        try:
            engine.shutdown()
        except BaseException:
            logger.exception("shutting the engine down failed")
    _exit(code)


def _send_quietly(fd: int, message: tuple[Any, ...]) -> None:
    try:
        write_frame(fd, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
    except (OSError, pickle.PicklingError, TypeError, AttributeError):
        pass


def _exit(code: int) -> None:
    """Exits without tearing down torch and the model (seconds nothing needs)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _EngineCore:
    """The loop of the core process: commands in, one step, outputs out.

    Encoding, pickling and writing the outputs happen in a sender thread, so that they overlap
    the engine's wait for the device (which releases the interpreter lock) instead of
    lengthening the step loop; messages leave in the order the loop posts them.
    """

    def __init__(self, engine: Any, commands_fd: int, outputs_fd: int, parent_pid: int) -> None:
        self.engine = engine
        self.commands_fd = commands_fd
        self.outputs_fd = outputs_fd
        self.parent_pid = parent_pid
        self.reader = FrameReader()
        self.encoder = OutputEncoder()  # the sender thread's
        self.failure: Optional[BaseException] = None  # what ended the sender thread
        self._outbox: queue.SimpleQueue[Optional[tuple[Any, ...]]] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="cacheflow-core-sender",
                                        daemon=True)
        os.set_blocking(commands_fd, False)
        self._sender.start()

    def run(self) -> None:
        """Serves until a ``shutdown`` command (returns) or the front end is gone
        (raises _ParentGone)."""
        engine = self.engine
        post = self._outbox.put
        last_stats: Optional[tuple[Any, ...]] = None
        with torch.inference_mode():
            while True:
                if self.failure is not None:
                    raise self.failure
                busy = engine.has_unfinished_requests()
                acks: list[tuple[str, Optional[BaseException]]] = []
                added: list[tuple[str, SamplingParams, bool]] = []
                stop = False
                for payload in self._read_commands(wait=not busy):
                    for command in pickle.loads(payload):
                        if command[0] == "shutdown":
                            stop = True
                            break
                        self._apply(command, acks, added)
                    if stop:
                        break
                if acks:
                    post(("added", acks, added))
                if stop:
                    return
                outputs = engine.step() if engine.has_unfinished_requests() else []
                stats = stats_tuple(collect_stats(engine))
                if outputs:
                    post(("out", outputs, stats))
                elif stats != last_stats:
                    post(("stats", stats))
                last_stats = stats

    def _apply(self, command: tuple[Any, ...], acks: list[tuple[str, Optional[BaseException]]],
               added: list[tuple[str, SamplingParams, bool]]) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, token_ids = command
            try:
                self.engine.add_request(request_id, prompt, params, token_ids)
            except Exception as exc:  # the front end raises it from add_request
                acks.append((request_id, portable_error(exc)))
            else:
                added.append((request_id, params, token_ids is not None))
                acks.append((request_id, None))
        elif command[0] == "abort":
            self.engine.abort_request(command[1])
        else:
            raise ValueError(f"unknown engine core command {command[0]!r}")

    def _read_commands(self, wait: bool) -> list[bytes]:
        """The command messages that came in; with ``wait``, blocks until one does."""
        fd = self.commands_fd
        while wait:
            readable, _, _ = select.select([fd], [], [], _PARENT_CHECK_S)
            if readable:
                break
            if os.getppid() != self.parent_pid or self.failure is not None:
                raise self.failure or _ParentGone()
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            raise _ParentGone()
        return self.reader.feed(data)

    # ------------------------------------------------------------------ sender thread
    def _send_loop(self) -> None:
        encoder = self.encoder
        try:
            while True:
                item = self._outbox.get()
                if item is None:
                    return
                kind = item[0]
                if kind == "out":
                    message: tuple[Any, ...] = ("out", encoder.encode(item[1]), item[2])
                elif kind == "added":
                    for request_id, params, has_token_ids in item[2]:
                        encoder.add(request_id, params, has_token_ids)
                    message = ("added", item[1])
                else:
                    message = item
                write_frame(self.outputs_fd,
                            pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:  # BrokenPipeError: nobody reads any more
            self.failure = _ParentGone()
        except BaseException as exc:
            logger.exception("sending the engine core's outputs failed")
            self.failure = exc

    def finish(self, last: Optional[tuple[Any, ...]] = None, timeout: float = 5.0) -> bool:
        """Sends what is queued (and ``last``), then stops the sender thread; False if it could
        not (it failed, or the front end does not read)."""
        if self.failure is None:
            if last is not None:
                self._outbox.put(last)
            self._outbox.put(None)
            self._sender.join(timeout)
        return self.failure is None and not self._sender.is_alive()
