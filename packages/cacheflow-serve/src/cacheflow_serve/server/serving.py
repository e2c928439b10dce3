"""What completions and chat share: the model context, request -> SamplingParams, adding the
engine requests of one API call, token strings and usage.

Tokenization, detokenization and chat templating run off the event loop (tokenization.py), so
that one big prompt does not hold up other requests (``/health`` included); a prompt text
longer than any prompt of ``max_model_len`` tokens can be is refused before tokenizing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from cacheflow_runtime import (
    BaseAsyncEngine,
    InvalidRequestError,
    RequestOutput,
    RequestStream,
    SamplingParams,
)
from cacheflow_runtime.sampling_params import keep_prompt_tail
from cacheflow_serve.inputs import check_prompt_text, max_prompt_chars
from cacheflow_serve.server.errors import APIError, bad_request, engine_error
from cacheflow_serve.server.metrics import ServerMetrics
from cacheflow_serve.server.protocol import SamplingFields
from cacheflow_serve.server.tokenization import Tokenization

T = TypeVar("T")


@dataclass
class ServingContext:
    """The engine and everything the handlers need to know about the served model.

    ``tokenizer`` is None when the server runs without one (``--skip-tokenizer-init``): prompts
    must then be token ids, and text comes back empty.
    """

    engine: BaseAsyncEngine
    tokenizer: Optional[Any]
    model_names: list[str]
    max_model_len: int
    metrics: ServerMetrics
    #: The model's sampling defaults (its generation config) for fields a request leaves unset.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    #: The server's chat template (``--chat-template``); None: the tokenizer's.
    chat_template: Optional[str] = None
    #: Whether a request may bring its own ``chat_template`` (``--trust-request-chat-template``).
    trust_request_chat_template: bool = False

    def __post_init__(self) -> None:
        self.tokenization = Tokenization(self.tokenizer)
        self.max_prompt_chars = (0 if self.tokenizer is None
                                 else max_prompt_chars(self.tokenizer, self.max_model_len))

    @property
    def model_name(self) -> str:
        """The name reported in responses."""
        return self.model_names[0]

    def check_model(self, name: Optional[str]) -> None:
        """404 unless ``name`` is one of the served names (None passes, for the extras)."""
        if name is not None and name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_names}", param="model", code="model_not_found")

    def require_tokenizer(self, param: str) -> Any:
        """The tokenizer (400 naming ``param`` when the server runs without one)."""
        if self.tokenizer is None:
            raise APIError(400, f"this server runs without a tokenizer (--skip-tokenizer-init): "
                           f"{param} needs one; send prompts as token ids", param=param)
        return self.tokenizer

    def chat_template_for(self, requested: Optional[str]) -> Optional[str]:
        """The template a chat request renders with: its own ``chat_template`` where the server
        trusts request templates (400 where it does not), else the server's."""
        if requested is None:
            return self.chat_template
        if not self.trust_request_chat_template:
            raise APIError(400, "this server does not take chat templates from requests; start "
                           "it with --trust-request-chat-template to allow them, or leave "
                           "chat_template out", param="chat_template")
        return requested

    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` run in the tokenizer threads."""
        return await self.tokenization.in_thread(fn, *args, **kwargs)

    def _check_text(self, text: str, param: str, bounded: bool) -> None:
        self.require_tokenizer(param)
        try:
            check_prompt_text(text, self.max_prompt_chars if bounded else len(text), param)
        except InvalidRequestError as exc:
            raise bad_request(exc) from None

    async def encode(self, text: str, param: str = "prompt",
                     add_special_tokens: bool = True, bounded: bool = True) -> list[int]:
        """The token ids of ``text``, as the engine would encode it (400 for text that is not
        valid Unicode or, when ``bounded``, longer than any prompt that fits the context);
        ``add_special_tokens=False`` for text a chat template rendered. ``bounded=False`` for a
        request whose ``truncate_prompt_tokens`` keeps only the prompt's tail (the body limit
        still bounds the text)."""
        self._check_text(text, param, bounded=bounded)
        return await self.tokenization.encode(text, add_special_tokens)

    async def encode_json(self, text: str, param: str = "prompt",
                          add_special_tokens: bool = True) -> tuple[int, str]:
        """(number of tokens, JSON list of the token ids) of ``text`` of any length."""
        self._check_text(text, param, bounded=False)
        return await self.tokenization.encode_json(text, add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` ("" without a tokenizer)."""
        if self.tokenizer is None:
            return ""
        return await self.off_loop(self.tokenizer.decode, token_ids)

    def token_text(self, token_id: int) -> str:
        """The text of one token, as logprobs report it ("" without a tokenizer)."""
        return "" if self.tokenizer is None else self.tokenizer.decode([token_id])


def new_id(prefix: str) -> str:
    """A fresh response id such as ``cmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """The ``created`` timestamp."""
    return int(time.time())


def check_tokenizer_needs(ctx: ServingContext, req: SamplingFields) -> None:
    """400 for what needs a tokenizer (stop strings, bad words) on a server without one."""
    if req.stop and ctx.tokenizer is None:
        ctx.require_tokenizer("stop")
    if req.bad_words and ctx.tokenizer is None:
        ctx.require_tokenizer("bad_words")


def check_stream_options(req: SamplingFields) -> None:
    """400 for ``stream_options`` on a request that does not stream (as vLLM and OpenAI), and
    for a streamed request whose ``best_of`` is not its ``n`` (its choices would have to be
    ranked before any of them is sent)."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be set when stream is true",
                       param="stream_options")
    if req.stream and req.best_of not in (None, req.n or 1):
        raise APIError(400, "best_of must equal n when streaming", param="best_of")


#: Request fields of vLLM's structured outputs (guided decoding), which this server does not do.
_CONSTRAINT_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern")


def check_output_constraints(req: SamplingFields) -> None:
    """400 for an output constraint this server cannot honour (a ``response_format`` other than
    text, or one of vLLM's structured-output fields), so that nobody takes unconstrained text
    for constrained output."""
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported "
                       "(structured outputs are not)", param="response_format")
    for name in _CONSTRAINT_FIELDS:
        if getattr(req, name) is not None:
            raise APIError(400, f"{name} is not supported: this server has no structured "
                           "outputs (guided decoding)", param=name)


def truncated_prompt(ctx: ServingContext, req: SamplingFields, token_ids: list[int]
                     ) -> list[int]:
    """``token_ids`` cut to the request's ``truncate_prompt_tokens`` (400 for a bad value)."""
    try:
        return keep_prompt_tail(token_ids, req.truncate_prompt_tokens, ctx.max_model_len)
    except ValueError as exc:
        raise bad_request(exc) from None


def check_length(ctx: ServingContext, prompt_len: int, max_tokens: Optional[int],
                 param: str, prompt_param: str) -> int:
    """The max_tokens to use: the asked number (400 if prompt + max_tokens exceed
    max_model_len) or, when None, whatever room the context leaves, at most the model's
    generation config's ``max_new_tokens`` (as vLLM). ``param`` and ``prompt_param`` name the
    request's fields for the two (``max_tokens``, ``prompt``)."""
    limit = ctx.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but the "
                       f"prompt has {prompt_len} tokens", param=prompt_param,
                       code="context_length_exceeded")
    if max_tokens is None:
        default = ctx.sampling_defaults.get("max_tokens")
        room = limit - prompt_len
        return room if default is None else min(room, int(default))
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens; you asked "
                       f"for {prompt_len + max_tokens} ({prompt_len} in the prompt, "
                       f"{max_tokens} in the completion); lower {param} or the prompt",
                       param=param, code="context_length_exceeded")
    return max_tokens


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: Optional[int],
                    defaults: Optional[Mapping[str, Any]] = None,
                    prompt_logprobs: Optional[int] = None) -> SamplingParams:
    """The engine's SamplingParams for a request (400 on a bad combination). A field the
    request leaves unset takes ``defaults`` (the model's generation config), else
    SamplingParams' own default."""
    model = dict(defaults or {})

    def pick(name: str, default: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else model.get(name, default)

    try:
        return SamplingParams(
            n=req.n or 1, best_of=req.best_of,
            temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", -1), min_p=pick("min_p", 0.0),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos), max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            skip_special_tokens=req.skip_special_tokens is not False,
            logit_bias=_logit_bias(req.logit_bias), allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words, truncate_prompt_tokens=req.truncate_prompt_tokens)
    except ValueError as exc:
        raise bad_request(exc) from None


def _logit_bias(bias: Optional[Mapping[str, float]]) -> Optional[dict[int, float]]:
    """OpenAI's ``logit_bias`` (token ids as JSON keys) with integer keys (400 for a key that
    is not a token id)."""
    if not bias:
        return None
    bad = [key for key in bias if not (key.strip().isascii() and key.strip().isdigit())]
    if bad:
        raise APIError(400, f"logit_bias keys must be token ids (non-negative integers), got "
                       f"{bad[:5]}", param="logit_bias")
    return {int(key): value for key, value in bias.items()}


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


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The ``usage`` of one streamed chunk under ``stream_options.continuous_usage_stats``: its
    choice's prompt and the tokens generated so far (vLLM's per-chunk figures)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stream_usage_options(req: SamplingFields) -> tuple[bool, bool]:
    """``(include_usage, continuous)`` of a streaming request: a last chunk with the call's
    usage (on whenever ``stream_options`` is given, as vLLM defaults it), and usage in every
    chunk as well (``continuous_usage_stats``, only with ``include_usage``)."""
    opts = req.stream_options
    include = bool(opts is not None and opts.include_usage)
    return include, include and bool(opts is not None and opts.continuous_usage_stats)


def usage(outputs: list[RequestOutput], prompt_only: bool = False) -> dict[str, Any]:
    """OpenAI ``usage`` of the final outputs of one API call (``prompt_tokens_details.
    cached_tokens``: prompt tokens served from the prefix cache; ``prompt_only``: no completion
    tokens, as for an echo with ``max_tokens`` 0)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = 0 if prompt_only else sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def top_entries(logprobs: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, logprob) pairs of one position."""
    return sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[:k]


def finite(value: Optional[float]) -> Optional[float]:
    """A logprob JSON can carry (-inf becomes -9999.0)."""
    if value is None:
        return None
    return max(float(value), -9999.0) if value == value else -9999.0


def completion_logprobs(ctx: ServingContext, token_ids: list[int],
                        logprobs: Sequence[Optional[dict[int, float]]], k: int, offset: int
                        ) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for the given tokens (a position without
    logprobs, as a prompt's first token, gets null entries). Each position's ``top_logprobs``
    holds its ``k`` most likely tokens and the token taken there, as OpenAI's do."""
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top: list[Optional[dict[str, Optional[float]]]] = []
    offsets: list[int] = []
    for token_id, position in zip(token_ids, logprobs):
        text = ctx.token_text(token_id)
        tokens.append(text)
        if position is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(finite(position.get(token_id)))
            entries = top_entries(position, k)
            if token_id in position and all(t != token_id for t, _ in entries):
                entries.append((token_id, position[token_id]))  # OpenAI: up to k + 1 entries
            top.append({ctx.token_text(t): finite(v) for t, v in entries})
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
