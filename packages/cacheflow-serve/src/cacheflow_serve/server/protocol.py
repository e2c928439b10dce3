"""Request bodies of the OpenAI-compatible API (pydantic), with cacheflow's few extensions.

Fields that OpenAI marks nullable accept ``null`` and mean the default. Unknown fields are
ignored, as the OpenAI API does for forward compatibility. Every string, nested ones included,
must be valid Unicode: JSON can carry a lone surrogate (``"\\ud800"``), which no tokenizer takes.
Numbers are finite (no ``NaN`` / ``Infinity``) and token ids are integers (``true`` is not 1).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MIN, UINT64_MAX = -(2 ** 63), 2 ** 64 - 1

Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, le=2 ** 31 - 1, strict=True)]


def lone_surrogate(value: Any) -> Optional[str]:
    """A description of the first lone surrogate in ``value`` (a string, or strings nested in
    lists and dicts, keys included), None if there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"lone surrogate {value[exc.start]!r} at index {exc.start}"
        return None
    items: Any = ()
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        items = value
    for item in items:
        found = lone_surrogate(item)
        if found is not None:
            return found
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        found = lone_surrogate(value)
        if found is not None:
            raise ValueError(f"text is not valid Unicode ({found})")
        return value


class StreamOptions(_Body):
    """``stream_options``: with ``include_usage`` (on unless set false, as in vLLM) a last chunk
    carries the call's token usage; ``continuous_usage_stats`` adds each chunk's running usage
    (its choice's prompt and tokens so far)."""

    include_usage: Optional[bool] = True
    continuous_usage_stats: Optional[bool] = False


class SamplingFields(_Body):
    """The fields that completions and chat share (OpenAI names, then cacheflow extensions)."""

    model: Optional[str] = None  # vLLM's: left out, the served model answers
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]] = None
    n: Optional[Annotated[int, Field(ge=1, le=128)]] = 1
    #: Sample this many and answer the ``n`` of highest cumulative logprob (equal to ``n`` when
    #: streaming).
    best_of: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[Penalty] = 0.0
    frequency_penalty: Optional[Penalty] = 0.0
    seed: Optional[Annotated[int, Field(ge=INT64_MIN, le=UINT64_MAX)]] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    # cacheflow extensions (as in vLLM)
    top_k: Optional[Annotated[int, Field(ge=-1)]] = None
    min_p: Optional[Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]] = None
    min_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    ignore_eos: Optional[bool] = False
    stop_token_ids: Optional[list[TokenId]] = None
    allowed_token_ids: Optional[Annotated[list[TokenId], Field(min_length=1)]] = None
    bad_words: Optional[list[str]] = None
    #: Keep only the prompt's last k tokens (-1: the last max_model_len), as vLLM's field.
    truncate_prompt_tokens: Optional[int] = None
    include_stop_str_in_output: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    # The generated ``token_ids`` of each choice and the ``prompt_token_ids`` (as in vLLM: on
    # each choice for completions, on the response, or a stream's role chunks, for chat).
    return_token_ids: Optional[bool] = False
    # Output constraints: only {"type": "text"} is served; the rest, and vLLM's structured-output
    # fields below, are refused with a 400 (serving.check_output_constraints) instead of being
    # dropped as unknown fields.
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[Any] = None
    guided_json: Optional[Any] = None
    guided_regex: Optional[Any] = None
    guided_choice: Optional[Any] = None
    guided_grammar: Optional[Any] = None
    guided_decoding_backend: Optional[Any] = None
    guided_whitespace_pattern: Optional[Any] = None


PromptType = Union[Annotated[str, Field()],
                   Annotated[list[str], Field(min_length=1)],
                   Annotated[list[TokenId], Field(min_length=1)],
                   Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                             Field(min_length=1)]]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: PromptType
    #: 0 only with ``echo``: the prompt back (with its logprobs, if asked), nothing generated.
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    echo: Optional[bool] = False
    logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    suffix: Optional[str] = None
    #: The tokenizer's special tokens (e.g. BOS) around a text prompt, as vLLM's field.
    add_special_tokens: Optional[bool] = True


class TextPart(_Body):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One message; ``developer`` is taken as ``system``; an ``assistant`` message may carry the
    tool calls it made and a ``tool`` message (a tool's result given back) name the call it
    answers, both passed to the chat template."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    #: A Jinja chat template of the request's own (vLLM's field; used only where the server runs
    #: with --trust-request-chat-template, refused with 400 elsewhere).
    chat_template: Optional[str] = None
    add_generation_prompt: Optional[bool] = True
    #: Leave the last (assistant) message open and continue it; excludes the generation prompt.
    continue_final_message: Optional[bool] = False
    #: The tokenizer's special tokens on top of those the chat template writes (vLLM's field;
    #: off, since templates write BOS themselves).
    add_special_tokens: Optional[bool] = False
    #: vLLM's: with a last message of the answer's role (assistant), its content leads each
    #: choice's content (what ``continue_final_message`` continued).
    echo: Optional[bool] = False


class TokenizeRequest(_Body):
    """``POST /tokenize``: a prompt, or chat messages rendered by the chat template."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1)]] = None
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    #: As the chat route takes them, for messages.
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    #: Default (null): on for a prompt, off for messages, as the generation routes encode them.
    add_special_tokens: Optional[bool] = None


class DetokenizeRequest(_Body):
    """``POST /detokenize``."""

    model: Optional[str] = None
    tokens: list[TokenId]
