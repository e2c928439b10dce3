"""Incremental detokenization, and how much of a running text a stream must hold back.

Tokens are decoded a few at a time with some context before them, so that multi-byte characters
and tokenizers that merge spaces produce the same text as decoding everything at once.
"""

from __future__ import annotations

from typing import Any

from cacheflow_runtime.sequence import Sequence

# Tokens of context decoded before the new ones.
_CONTEXT_TOKENS = 5


def decode_new_text(tokenizer: Any, seq: Sequence, skip_special_tokens: bool) -> str:
    """Appends the text of ``seq``'s newest token to ``seq.output_text`` and returns it.

    Returns "" while the new bytes do not yet form a whole character.
    """
    if seq.tokens is None:
        seq.tokens = list(tokenizer.convert_ids_to_tokens(
            seq.prompt_token_ids, skip_special_tokens=skip_special_tokens))
        seq.read_offset = len(seq.tokens)
        seq.prefix_offset = max(seq.read_offset - _CONTEXT_TOKENS, 0)
        # Tokens already generated before this sequence existed (a fork or a recompute).
        for token_id in seq.output_token_ids[:-1]:
            _append_token(tokenizer, seq, token_id, skip_special_tokens)
        seq.output_text = tokenizer.decode(seq.output_token_ids[:-1],
                                           skip_special_tokens=skip_special_tokens)
        seq.prefix_offset = max(len(seq.tokens) - _CONTEXT_TOKENS, 0)
        seq.read_offset = len(seq.tokens)
    return _append_token(tokenizer, seq, seq.output_token_ids[-1], skip_special_tokens,
                         emit=True)


def _append_token(tokenizer: Any, seq: Sequence, token_id: int, skip_special_tokens: bool,
                  emit: bool = False) -> str:
    assert seq.tokens is not None
    seq.tokens.extend(tokenizer.convert_ids_to_tokens([token_id],
                                                      skip_special_tokens=skip_special_tokens))
    if not emit:
        return ""
    prefix = tokenizer.convert_tokens_to_string(seq.tokens[seq.prefix_offset:seq.read_offset])
    full = tokenizer.convert_tokens_to_string(seq.tokens[seq.prefix_offset:])
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    delta = full[len(prefix):]
    seq.prefix_offset = seq.read_offset
    seq.read_offset = len(seq.tokens)
    seq.output_text += delta
    return delta


def flush_text(tokenizer: Any, seq: Sequence) -> str:
    """Appends the text that ``decode_new_text`` still holds back (the bytes of a character the
    sequence never finished) to ``seq.output_text`` and returns it; for a finished sequence, so
    that its text is what decoding all its tokens at once gives."""
    if seq.tokens is None or seq.read_offset >= len(seq.tokens):
        return ""
    prefix = tokenizer.convert_tokens_to_string(seq.tokens[seq.prefix_offset:seq.read_offset])
    full = tokenizer.convert_tokens_to_string(seq.tokens[seq.prefix_offset:])
    delta = full[len(prefix):]
    seq.prefix_offset = seq.read_offset
    seq.read_offset = len(seq.tokens)
    seq.output_text += delta
    return delta


def stop_string_holdback(text: str, stop_strings: list[str]) -> int:
    """How many characters at the end of a running sequence's ``text`` a stream must hold back:
    the longest tail that is the start of a stop string, so that text a stop string will cut is
    never streamed and then retracted."""
    longest = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
