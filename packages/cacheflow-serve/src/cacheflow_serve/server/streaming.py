"""Streaming plumbing: text deltas that never retract, merged request streams, SSE framing,
and noticing a client that went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Optional, Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from cacheflow_runtime import RequestOutput, RequestStream, stop_string_holdback

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class TextDelta:
    """Turns the cumulative text of one choice into deltas.

    While the sequence runs, the tail that could still become a stop string is held back, so a
    stop string that the engine cuts later was never sent.
    """

    def __init__(self, stop_strings: list[str]) -> None:
        self.stop_strings = stop_strings
        self.sent_chars = 0
        self.sent_tokens = 0

    def text(self, text: str, finished: bool) -> str:
        """The new text to send for the cumulative ``text``."""
        end = len(text)
        if not finished and self.stop_strings:
            end -= stop_string_holdback(text, self.stop_strings)
        if end <= self.sent_chars:
            return ""
        delta = text[self.sent_chars:end]
        self.sent_chars = end
        return delta

    def tokens(self, num_tokens: int) -> range:
        """Indices of the tokens not sent yet (the caller sends them now)."""
        new = range(self.sent_tokens, num_tokens)
        self.sent_tokens = max(self.sent_tokens, num_tokens)
        return new


async def merge_streams(streams: list[RequestStream]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yields ``(index, output)`` from several request streams as outputs come; leaving early
    (or an error in one) aborts every stream that has not finished."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, Optional[RequestOutput | BaseException]]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:  # handed to the consumer
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work``, cancelling it (and raising ClientDisconnected) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        raise ClientDisconnected()
    return task.result()


class StreamingCall(Protocol):
    """One API call after its requests were added: as SSE events, or collected into a body."""

    def events(self) -> AsyncIterator[str]: ...

    async def collect(self) -> Any: ...

    def body(self, final: Any) -> dict[str, Any]: ...


async def respond(call: StreamingCall, stream: bool, raw: Request) -> Response:
    """The HTTP response of ``call``: an event stream, or the collected JSON body (499 when the
    client leaves before it is ready)."""
    if stream:
        return EventStreamResponse(call.events())
    try:
        final = await unless_disconnected(raw, call.collect())
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(call.body(final))


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that stops (and closes its generator, which aborts the
    requests behind it) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], status_code: int = 200) -> None:
        super().__init__(content, status_code=status_code, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


class ChoiceEvent:
    """What one streamed chunk of one choice carries."""

    __slots__ = ("index", "text", "token_ids", "logprobs", "finish_reason", "stop_reason",
                 "first", "prompt_logprobs", "prompt_tokens", "completion_tokens")

    def __init__(self, index: int, text: str, token_ids: list[int],
                 logprobs: Optional[list[dict[int, float]]], finish_reason: Optional[str],
                 stop_reason: Any, first: bool,
                 prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None,
                 prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.index = index
        self.text = text
        self.token_ids = token_ids
        self.logprobs = logprobs
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.first = first
        self.prompt_logprobs = prompt_logprobs  # on a choice's first event, when asked for
        self.prompt_tokens = prompt_tokens  # the choice's prompt length
        self.completion_tokens = completion_tokens  # the choice's tokens so far


async def choice_events(streams: list[RequestStream], n: int, stop_strings: list[str],
                        finals: list[Optional[RequestOutput]], with_logprobs: bool
                        ) -> AsyncIterator[ChoiceEvent]:
    """The chunks of every choice of one API call: choice ``i * n + j`` is sequence ``j`` of
    prompt ``i``. A chunk comes when a choice has new text (or new tokens, with logprobs) and
    once when it finishes; ``finals[i]`` is set to prompt ``i``'s finished output."""
    deltas: dict[int, TextDelta] = {}
    done: set[int] = set()
    # Choices with a chunk sent: a choice's first output may carry no text yet (the bytes of
    # an unfinished character are held back), and its first chunk is the one that echoes.
    started: set[int] = set()
    async for prompt_index, out in merge_streams(streams):
        for comp in out.outputs:
            index = prompt_index * n + comp.index
            if index in done:
                continue
            delta = deltas.get(index)
            if delta is None:
                delta = deltas[index] = TextDelta(stop_strings)
            finished = comp.finish_reason is not None
            text = delta.text(comp.text, finished)
            new = delta.tokens(len(comp.token_ids))
            if not text and not finished and not (with_logprobs and len(new)):
                continue
            logprobs = None
            if with_logprobs and comp.logprobs is not None:
                logprobs = [comp.logprobs[i] for i in new]
            if finished:
                done.add(index)
            first = index not in started
            started.add(index)
            yield ChoiceEvent(index, text, [comp.token_ids[i] for i in new], logprobs,
                              comp.finish_reason, comp.stop_reason, first,
                              out.prompt_logprobs if first else None,
                              len(out.prompt_token_ids), len(comp.token_ids))
        if out.finished:
            finals[prompt_index] = out
