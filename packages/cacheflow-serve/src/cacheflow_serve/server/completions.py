"""``POST /v1/completions``: one engine request per prompt, answered whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import Response

from cacheflow_runtime import RequestOutput, RequestStream
from cacheflow_serve.server.errors import APIError, error_body, stream_error
from cacheflow_serve.server.protocol import CompletionRequest
from cacheflow_serve.server.serving import (
    ServingContext,
    add_requests,
    check_length,
    check_output_constraints,
    check_stream_options,
    check_tokenizer_needs,
    completion_logprobs,
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

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


async def _prompts(ctx: ServingContext, prompt: Any, add_special_tokens: bool,
                   bounded: bool = True) -> list[tuple[str, list[int]]]:
    """(text, token ids) of each prompt of the request (``bounded`` as for ``ctx.encode``)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(p, str) for p in prompt):
        return [(p, await ctx.encode(p, add_special_tokens=add_special_tokens, bounded=bounded))
                for p in prompt]
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    return [(await ctx.decode(list(ids)), list(ids)) for ids in prompt]


async def create_completion(ctx: ServingContext, req: CompletionRequest,
                            raw: Request) -> Response:
    """Serves one completions call."""
    ctx.check_model(req.model)
    check_tokenizer_needs(ctx, req)
    check_stream_options(req)
    check_output_constraints(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens 0 needs echo: true (it returns the prompt only)",
                       param="max_tokens")
    # A prompt that truncate_prompt_tokens cuts may be longer than any that fits the context.
    prompts = await _prompts(ctx, req.prompt, req.add_special_tokens is not False,
                             bounded=req.truncate_prompt_tokens is None)
    if req.truncate_prompt_tokens is not None:  # an echo shows the prompt that was kept
        kept = [truncated_prompt(ctx, req, ids) for _, ids in prompts]
        prompts = [(text if len(k) == len(ids) else await ctx.decode(k), k)
                   for (text, ids), k in zip(prompts, kept)]
    # With echo, the prompt's tokens get logprobs too, as the legacy API gives them.
    prompt_logprobs = req.logprobs if req.echo else None
    params = []
    for _, ids in prompts:
        if req.max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, check_length(ctx, len(ids), None, "max_tokens",
                                                            "prompt"))
        else:
            # A prompt-only echo runs the prompt step, whose one sampled token is dropped.
            max_tokens = check_length(ctx, len(ids), max(req.max_tokens, 1), "max_tokens",
                                      "prompt")
        params.append(sampling_params(req, max_tokens, req.logprobs,
                                      defaults=ctx.sampling_defaults,
                                      prompt_logprobs=prompt_logprobs))
    request_id = new_id("cmpl")
    streams = await add_requests(ctx, request_id, [ids for _, ids in prompts], params)
    return await respond(_Call(ctx, req, request_id, prompts, streams), bool(req.stream), raw)


class _Call:
    """One completions call after its requests were added."""

    def __init__(self, ctx: ServingContext, req: CompletionRequest, request_id: str,
                 prompts: list[tuple[str, list[int]]], streams: list[RequestStream]) -> None:
        self.ctx = ctx
        self.req = req
        self.id = request_id
        self.created = now()
        self.prompts = prompts
        self.streams = streams
        self.n = req.n or 1
        self.stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        self.prompt_only = req.max_tokens == 0

    def _logprobs(self, p_index: int, token_ids: list[int],
                  logprobs: Optional[list[dict[int, float]]],
                  prompt_logprobs: Optional[list[Optional[dict[int, float]]]],
                  offset: int) -> Optional[dict[str, Any]]:
        """The ``logprobs`` object of a choice's tokens, led by the prompt's (with echo, on the
        choice's first chunk) and without generated tokens for a prompt-only echo."""
        k = self.req.logprobs
        if k is None:
            return None
        ids: list[int] = []
        positions: list[Optional[dict[int, float]]] = []
        if prompt_logprobs is not None:
            ids.extend(self.prompts[p_index][1])
            positions.extend(prompt_logprobs)
        if not self.prompt_only and logprobs is not None:
            ids.extend(token_ids)
            positions.extend(logprobs)
        return completion_logprobs(self.ctx, ids, positions, k, offset)

    async def collect(self) -> list[Optional[RequestOutput]]:
        """The finished output of each prompt."""
        finals: list[Optional[RequestOutput]] = [None] * len(self.streams)
        try:
            async for _ in choice_events(self.streams, self.n, [], finals, False):
                pass
        except Exception as exc:
            raise stream_error(exc) from None
        return finals

    def body(self, finals: list[Optional[RequestOutput]]) -> dict[str, Any]:
        """The non-streaming response."""
        choices = []
        for p_index, out in enumerate(finals):
            assert out is not None
            prompt_text = self.prompts[p_index][0]
            for comp in out.outputs:
                generated = "" if self.prompt_only else comp.text
                text = prompt_text + generated if self.req.echo else generated
                logprobs = self._logprobs(p_index, list(comp.token_ids), comp.logprobs,
                                          out.prompt_logprobs if self.req.echo else None, 0)
                finish_reason = "length" if self.prompt_only else comp.finish_reason
                self.ctx.metrics.count_finished(finish_reason)
                choice = {"index": p_index * self.n + comp.index, "text": text,
                          "logprobs": logprobs, "finish_reason": finish_reason,
                          "stop_reason": None if self.prompt_only else comp.stop_reason}
                if self.req.return_token_ids:
                    choice["prompt_token_ids"] = self.prompts[p_index][1]
                    choice["token_ids"] = [] if self.prompt_only else list(comp.token_ids)
                choices.append(choice)
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.ctx.model_name, "choices": choices, "system_fingerprint": None,
                "usage": usage([o for o in finals if o is not None], self.prompt_only)}

    def _chunk(self, choices: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.id, "object": "text_completion",
                                 "created": self.created, "model": self.ctx.model_name,
                                 "choices": choices, "system_fingerprint": None}
        if with_usage:
            chunk["usage"] = None
        return chunk

    async def events(self) -> AsyncIterator[str]:
        """The SSE stream: one chunk per choice update, the usage chunk if asked, [DONE]."""
        include_usage, continuous = stream_usage_options(self.req)
        finals: list[Optional[RequestOutput]] = [None] * len(self.streams)
        k = self.req.logprobs
        offsets: dict[int, int] = {}
        try:
            # Every new token makes a chunk when logprobs or token ids are streamed.
            per_token = k is not None or bool(self.req.return_token_ids)
            async for ev in choice_events(self.streams, self.n, self.stops, finals, per_token):
                p_index = ev.index // self.n
                text = "" if self.prompt_only else ev.text
                if ev.first and self.req.echo:
                    text = self.prompts[p_index][0] + text
                echoed = ev.prompt_logprobs if ev.first and self.req.echo else None
                logprobs = None
                if k is not None and (echoed is not None or
                                      (ev.logprobs is not None and not self.prompt_only)):
                    offset = offsets.get(ev.index, 0)
                    logprobs = self._logprobs(p_index, ev.token_ids, ev.logprobs, echoed,
                                              offset)
                    assert logprobs is not None
                    offsets[ev.index] = offset + sum(len(t) for t in logprobs["tokens"])
                if self.prompt_only and not ev.first and ev.finish_reason is None:
                    continue
                finish_reason = ev.finish_reason
                if self.prompt_only and finish_reason is not None:
                    finish_reason = "length"
                if finish_reason is not None:
                    self.ctx.metrics.count_finished(finish_reason)
                choice = {"index": ev.index, "text": text, "logprobs": logprobs,
                          "finish_reason": finish_reason,
                          "stop_reason": None if self.prompt_only else ev.stop_reason}
                if self.req.return_token_ids:
                    choice["token_ids"] = [] if self.prompt_only else ev.token_ids
                    if ev.first:
                        choice["prompt_token_ids"] = self.prompts[p_index][1]
                chunk = self._chunk([choice], include_usage)
                if continuous:
                    chunk["usage"] = running_usage(
                        ev.prompt_tokens, 0 if self.prompt_only else ev.completion_tokens)
                yield sse(chunk)
            if include_usage:
                chunk = self._chunk([], include_usage)
                chunk["usage"] = usage([o for o in finals if o is not None], self.prompt_only)
                yield sse(chunk)
        except Exception as exc:  # the engine died or was shut down under us
            err = stream_error(exc)
            yield sse(error_body(err.status, err.message, code=err.code))
        yield DONE
