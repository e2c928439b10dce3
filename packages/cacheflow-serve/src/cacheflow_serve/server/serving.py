"""What completions and chat share: the model context, request -> SamplingParams, adding the
engine requests of one API call, token strings and usage."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from cacheflow_runtime import AsyncLLMEngine, RequestOutput, RequestStream, SamplingParams
from cacheflow_serve.server.errors import APIError, bad_request, engine_error
from cacheflow_serve.server.metrics import ServerMetrics
from cacheflow_serve.server.protocol import SamplingFields


@dataclass
class ServingContext:
    """The engine and everything the handlers need to know about the served model."""

    engine: AsyncLLMEngine
    tokenizer: Any
    model_names: list[str]
    max_model_len: int
    metrics: ServerMetrics
    #: The model's sampling defaults (its generation config) for fields a request leaves unset.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        """The name reported in responses."""
        return self.model_names[0]

    def check_model(self, name: Optional[str]) -> None:
        """404 unless ``name`` is one of the served names (None passes, for the extras)."""
        if name is not None and name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_names}", param="model", code="model_not_found")

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``, as the engine would encode it."""
        return list(self.tokenizer.encode(text))

    def token_text(self, token_id: int) -> str:
        """The text of one token, as logprobs report it."""
        return self.tokenizer.decode([token_id])


def new_id(prefix: str) -> str:
    """A fresh response id such as ``cmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """The ``created`` timestamp."""
    return int(time.time())


def check_unsupported(req: SamplingFields) -> None:
    """400 for OpenAI features cacheflow does not implement (rather than ignoring them)."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def check_length(ctx: ServingContext, prompt_len: int, max_tokens: Optional[int],
                 param: str) -> int:
    """The max_tokens to use: the asked number (400 if prompt + max_tokens exceed
    max_model_len) or, when None, whatever room the context leaves."""
    limit = ctx.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but the "
                       f"prompt has {prompt_len} tokens", param="prompt" if param == "max_tokens"
                       else "messages", code="context_length_exceeded")
    if max_tokens is None:
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens; you asked "
                       f"for {prompt_len + max_tokens} ({prompt_len} in the prompt, "
                       f"{max_tokens} in the completion); lower {param} or the prompt",
                       param=param, code="context_length_exceeded")
    return max_tokens


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: Optional[int],
                    best_of: Optional[int] = None,
                    defaults: Optional[Mapping[str, Any]] = None) -> SamplingParams:
    """The engine's SamplingParams for a request (400 on a bad combination). A field the
    request leaves unset takes ``defaults`` (the model's generation config), else
    SamplingParams' own default."""
    model = dict(defaults or {})

    def pick(name: str, default: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else model.get(name, default)

    try:
        return SamplingParams(
            n=req.n or 1, best_of=best_of,
            temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", -1), min_p=pick("min_p", 0.0),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos), max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0, logprobs=logprobs,
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            skip_special_tokens=req.skip_special_tokens is not False)
    except ValueError as exc:
        raise bad_request(exc) from None


async def add_requests(ctx: ServingContext, request_id: str, prompts: list[list[int]],
                       params: list[SamplingParams]) -> list[RequestStream]:
    """Adds one engine request per prompt; if any is refused, aborts the others and raises the
    fitting APIError."""
    streams: list[RequestStream] = []
    try:
        for index, (token_ids, p) in enumerate(zip(prompts, params)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{index}"
            streams.append(await ctx.engine.add_request(rid, None, p, token_ids))
    except BaseException as exc:
        for stream in streams:
            stream.abort()
        if isinstance(exc, Exception):
            raise engine_error(exc) from None
        raise
    return streams


def usage(outputs: list[RequestOutput]) -> dict[str, int]:
    """OpenAI ``usage`` of the final outputs of one API call."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def top_entries(logprobs: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, logprob) pairs of one position."""
    return sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[:k]


def finite(value: Optional[float]) -> Optional[float]:
    """A logprob JSON can carry (-inf becomes -9999.0)."""
    if value is None:
        return None
    return max(float(value), -9999.0) if value == value else -9999.0


def completion_logprobs(ctx: ServingContext, token_ids: list[int],
                        logprobs: list[dict[int, float]], k: int, offset: int
                        ) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for the given tokens."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, position in zip(token_ids, logprobs):
        text = ctx.token_text(token_id)
        tokens.append(text)
        token_logprobs.append(finite(position.get(token_id)))
        top.append({ctx.token_text(t): finite(v) for t, v in top_entries(position, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def _chat_token(ctx: ServingContext, token_id: int, value: Optional[float]) -> dict[str, Any]:
    text = ctx.token_text(token_id)
    return {"token": text, "logprob": finite(value), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list[dict[int, float]],
                  k: int) -> dict[str, Any]:
    """The chat ``logprobs`` object (``{"content": [...]}``) for the given tokens."""
    content = []
    for token_id, position in zip(token_ids, logprobs):
        entry = _chat_token(ctx, token_id, position.get(token_id))
        entry["top_logprobs"] = [_chat_token(ctx, t, v) for t, v in top_entries(position, k)]
        content.append(entry)
    return {"content": content}
