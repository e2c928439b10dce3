"""``POST /v1/chat/completions``: messages rendered by the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import Response

from cacheflow_runtime import InvalidRequestError, RequestOutput, RequestStream
from cacheflow_serve.chat_template import render_chat as render_chat_text
from cacheflow_serve.chat_template import template_messages
from cacheflow_serve.server.errors import APIError, bad_request, error_body, stream_error
from cacheflow_serve.server.protocol import ChatCompletionRequest, ChatMessage
from cacheflow_serve.server.serving import (
    ServingContext,
    add_requests,
    chat_logprobs,
    check_length,
    check_output_constraints,
    check_stream_options,
    check_tokenizer_needs,
    new_id,
    now,
    running_usage,
    sampling_params,
    stream_usage_options,
    truncated_prompt,
    usage,
)
from cacheflow_serve.server.streaming import (
    DONE,
    choice_events,
    respond,
    sse,
)


async def render_chat(ctx: ServingContext, messages: list[ChatMessage],
                      add_generation_prompt: bool = True,
                      continue_final_message: bool = False,
                      chat_template_kwargs: Optional[dict[str, Any]] = None,
                      chat_template: Optional[str] = None) -> str:
    """The prompt text of ``messages`` by the chat template (the request's ``chat_template``
    where the server trusts it, else the server's, else the tokenizer's), rendered in the
    tokenizer threads (400 if it fails or there is no template); ``chat_template_kwargs`` are
    more variables for the template (vLLM's fields)."""
    tokenizer = ctx.require_tokenizer("messages")
    template = ctx.chat_template_for(chat_template)
    dicts = [message.model_dump(exclude_none=True) for message in messages]
    try:
        return await ctx.off_loop(render_chat_text, tokenizer, dicts,
                                  add_generation_prompt=add_generation_prompt,
                                  continue_final_message=continue_final_message,
                                  chat_template=template,
                                  chat_template_kwargs=chat_template_kwargs)
    except InvalidRequestError as exc:
        raise bad_request(exc) from None


def _check_chat_features(ctx: ServingContext, req: ChatCompletionRequest) -> None:
    check_tokenizer_needs(ctx, req)
    check_stream_options(req)
    check_output_constraints(req)
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if req.tool_choice not in (None, "none"):
        raise APIError(400, "tool_choice is not supported", param="tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def _answer_role(req: ChatCompletionRequest) -> str:
    """The role the answer is given: ``assistant`` after a generation prompt, else the last
    message's (it is continued as is; vLLM's rule)."""
    return "assistant" if req.add_generation_prompt is not False else req.messages[-1].role


def _echoed(req: ChatCompletionRequest) -> str:
    """What ``echo`` puts before each choice's content: the last message's text when it has the
    answer's role, else nothing (vLLM's rule)."""
    last = req.messages[-1]
    if not req.echo or last.role != _answer_role(req):
        return ""
    return template_messages([last.model_dump(exclude_none=True)])[0]["content"]


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest,
                                 raw: Request) -> Response:
    """Serves one chat completions call."""
    ctx.check_model(req.model)
    _check_chat_features(ctx, req)
    prompt = await render_chat(ctx, req.messages, req.add_generation_prompt is not False,
                               req.continue_final_message is True, req.chat_template_kwargs,
                               req.chat_template)
    ids = await ctx.encode(prompt, param="messages",
                           add_special_tokens=req.add_special_tokens is True,
                           bounded=req.truncate_prompt_tokens is None)
    ids = truncated_prompt(ctx, req, ids)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = check_length(ctx, len(ids), asked, param, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens, k, defaults=ctx.sampling_defaults)
    request_id = new_id("chatcmpl")
    streams = await add_requests(ctx, request_id, [ids], params=[params])
    return await respond(_ChatCall(ctx, req, request_id, streams, k, ids), bool(req.stream),
                         raw)


class _ChatCall:
    """One chat call after its request was added."""

    def __init__(self, ctx: ServingContext, req: ChatCompletionRequest, request_id: str,
                 streams: list[RequestStream], k: Optional[int], prompt_ids: list[int]) -> None:
        self.ctx = ctx
        self.req = req
        self.id = request_id
        self.created = now()
        self.streams = streams
        self.k = k
        self.prompt_ids = prompt_ids
        self.n = req.n or 1
        self.stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        self.role = _answer_role(req)
        self.echo = _echoed(req)

    async def collect(self) -> RequestOutput:
        """The finished output."""
        finals: list[Optional[RequestOutput]] = [None]
        try:
            async for _ in choice_events(self.streams, self.n, [], finals, False):
                pass
        except Exception as exc:
            raise stream_error(exc) from None
        assert finals[0] is not None
        return finals[0]

    def body(self, final: RequestOutput) -> dict[str, Any]:
        """The non-streaming response."""
        choices = []
        for comp in final.outputs:
            logprobs = None
            if self.k is not None and comp.logprobs is not None:
                logprobs = chat_logprobs(self.ctx, comp.token_ids, comp.logprobs, self.k)
            self.ctx.metrics.count_finished(comp.finish_reason)
            choice = {"index": comp.index,
                      "message": {"role": self.role, "content": self.echo + comp.text},
                      "logprobs": logprobs, "finish_reason": comp.finish_reason,
                      "stop_reason": comp.stop_reason}
            if self.req.return_token_ids:
                choice["token_ids"] = list(comp.token_ids)
            choices.append(choice)
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion",
                                "created": self.created, "model": self.ctx.model_name,
                                "choices": choices, "system_fingerprint": None,
                                "usage": usage([final])}
        if self.req.return_token_ids:  # vLLM's place: the response's, not a choice's
            body["prompt_token_ids"] = list(final.prompt_token_ids)
        return body

    def _chunk(self, choices: list[dict[str, Any]], with_usage: bool,
               running: Optional[tuple[int, int]] = None, **extra: Any) -> str:
        """One SSE chunk; ``running`` (prompt, completion tokens) fills its ``usage`` under
        ``continuous_usage_stats``."""
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                                 "created": self.created, "model": self.ctx.model_name,
                                 "choices": choices, "system_fingerprint": None, **extra}
        if with_usage:
            chunk["usage"] = None if running is None else running_usage(*running)
        return sse(chunk)

    async def events(self) -> AsyncIterator[str]:
        """The SSE stream: a role chunk per choice, content chunks, usage if asked, [DONE]."""
        include_usage, continuous = stream_usage_options(self.req)
        start = (len(self.prompt_ids), 0) if continuous else None
        token_ids = bool(self.req.return_token_ids)
        finals: list[Optional[RequestOutput]] = [None]
        for index in range(self.n):
            extra = {"prompt_token_ids": self.prompt_ids} if token_ids else {}
            yield self._chunk([{"index": index, "delta": {"role": self.role, "content": ""},
                                "logprobs": None, "finish_reason": None}], include_usage,
                              start, **extra)
            if self.echo:
                yield self._chunk([{"index": index, "delta": {"content": self.echo},
                                    "logprobs": None, "finish_reason": None}], include_usage,
                                  start)
        try:
            # Every new token makes a chunk when logprobs or token ids are streamed.
            per_token = self.k is not None or token_ids
            async for ev in choice_events(self.streams, self.n, self.stops, finals, per_token):
                logprobs = None
                if self.k is not None and ev.logprobs is not None:
                    logprobs = chat_logprobs(self.ctx, ev.token_ids, ev.logprobs, self.k)
                if ev.finish_reason is not None:
                    self.ctx.metrics.count_finished(ev.finish_reason)
                delta = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
                choice = {"index": ev.index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": ev.finish_reason, "stop_reason": ev.stop_reason}
                if token_ids:
                    choice["token_ids"] = ev.token_ids
                running = (ev.prompt_tokens, ev.completion_tokens) if continuous else None
                yield self._chunk([choice], include_usage, running)
            if include_usage and finals[0] is not None:
                chunk = {"id": self.id, "object": "chat.completion.chunk",
                         "created": self.created, "model": self.ctx.model_name, "choices": [],
                         "system_fingerprint": None, "usage": usage([finals[0]])}
                yield sse(chunk)
        except Exception as exc:  # the engine died or was shut down under us
            err = stream_error(exc)
            yield sse(error_body(err.status, err.message, code=err.code))
        yield DONE
