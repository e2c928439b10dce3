"""Prompt checks shared by the offline ``LLM`` and the server, done before any tokenization:
valid Unicode, a length that can fit the context, token ids that are integers; and the prompt
dicts ``LLM.generate`` takes (vLLM's ``TextPrompt`` and ``TokensPrompt``)."""

from __future__ import annotations

from typing import Any, TypedDict

from cacheflow_runtime.config import is_int
from cacheflow_runtime.errors import InvalidRequestError, check_text


class TextPrompt(TypedDict):
    """A prompt as text: ``{"prompt": "..."}``."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    """A prompt as token ids (``prompt`` optional: its text, for the output)."""

    prompt: str


# Margin on the longest token's length, for normalizers that drop characters (accents,
# control characters) so that a token stands for more characters than its vocabulary entry.
_NORMALIZER_MARGIN = 4


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    """How many characters a prompt of at most ``max_model_len`` tokens can have.

    A token never stands for more characters than its longest vocabulary entry has (byte-level
    and SentencePiece vocabularies spell each input character with at least one character), so
    a longer text has more tokens than the context holds and can be refused before it is
    tokenized (which costs seconds for megabytes of text).
    """
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_model_len * max(longest, 1) * _NORMALIZER_MARGIN


def check_prompt_text(text: Any, limit: int, param: str = "prompt") -> str:
    """``text`` if it is a string of valid Unicode within ``limit`` characters, else
    InvalidRequestError naming ``param``."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"{param} must be a string, got {type(text).__name__}",
                                  param=param)
    check_text(text, param)
    if len(text) > limit:
        raise InvalidRequestError(
            f"{param} has {len(text)} characters, more than a prompt within this model's "
            f"maximum context length can have ({limit}); shorten it",
            param=param, code="context_length_exceeded")
    return text


def check_token_ids(token_ids: Any, vocab_size: int, param: str = "prompt") -> list[int]:
    """``token_ids`` as a list of ints in ``[0, vocab_size)`` (InvalidRequestError for anything
    else, bools included: ``True`` is not token id 1)."""
    if not isinstance(token_ids, (list, tuple)):
        raise InvalidRequestError(f"prompt_token_ids must be a list of integers, got "
                                  f"{type(token_ids).__name__}", param=param)
    bad = [t for t in token_ids if not is_int(t) or not 0 <= t < vocab_size]
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size}); "
                                  f"got {bad[:5]!r}{more}", param=param)
    return [int(t) for t in token_ids]
