"""Incremental detokenization, and how much of a running text a stream must hold back.

Tokens are decoded a few at a time with some context before them, so that multi-byte characters
and tokenizers that merge spaces produce the same text as decoding everything at once.
"""

from __future__ import annotations

from typing import Any

from cacheflow_runtime.sequence import Sequence

# Tokens of context decoded before the new ones.
_CONTEXT_TOKENS = 5


class Detokenizer:
    """Incremental detokenization of sequences with one tokenizer.

    What ``convert_ids_to_tokens([token_id], skip_special_tokens=...)`` gives for a generated
    token is remembered per token id (at most one entry per id of the vocabulary), so that a
    step costs one dict lookup per new token instead of a tokenizer call (an HF tokenizer
    recomputes its special token ids in every call that skips them). The tokenizer must not
    change while the detokenizer is in use.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # skip_special_tokens -> token id -> the tokens it converts to (none or one).
        self._token_strings: dict[bool, dict[int, tuple[str, ...]]] = {False: {}, True: {}}

    def decode_new_text(self, seq: Sequence, skip_special_tokens: bool) -> str:
        """Appends the text of ``seq``'s newest token to ``seq.output_text`` and returns it.

        Returns "" while the new bytes do not yet form a whole character.
        """
        if seq.tokens is None:
            seq.tokens = list(self.tokenizer.convert_ids_to_tokens(
                seq.prompt_token_ids, skip_special_tokens=skip_special_tokens))
            seq.read_offset = len(seq.tokens)
            seq.prefix_offset = max(seq.read_offset - _CONTEXT_TOKENS, 0)
            # Tokens already generated before this sequence existed (a fork or a recompute).
            for token_id in seq.output_token_ids[:-1]:
                seq.tokens.extend(self._tokens_of(token_id, skip_special_tokens))
            seq.output_text = self.tokenizer.decode(seq.output_token_ids[:-1],
                                                    skip_special_tokens=skip_special_tokens)
            seq.prefix_offset = max(len(seq.tokens) - _CONTEXT_TOKENS, 0)
            seq.read_offset = len(seq.tokens)
        seq.tokens.extend(self._tokens_of(seq.output_token_ids[-1], skip_special_tokens))
        return self._emit(seq, hold_partial=True)

    def flush_text(self, seq: Sequence) -> str:
        """Appends the text that ``decode_new_text`` still holds back (the bytes of a character
        the sequence never finished) to ``seq.output_text`` and returns it; for a finished
        sequence, so that its text is what decoding all its tokens at once gives."""
        if seq.tokens is None or seq.read_offset >= len(seq.tokens):
            return ""
        return self._emit(seq, hold_partial=False)

    def _tokens_of(self, token_id: int, skip_special_tokens: bool) -> tuple[str, ...]:
        """``convert_ids_to_tokens([token_id], skip_special_tokens=...)``, remembered."""
        known = self._token_strings[skip_special_tokens]
        tokens = known.get(token_id)
        if tokens is None:
            tokens = known[token_id] = tuple(self.tokenizer.convert_ids_to_tokens(
                [token_id], skip_special_tokens=skip_special_tokens))
        return tokens

    def _emit(self, seq: Sequence, hold_partial: bool) -> str:
        """Decodes the tokens from ``read_offset`` on (with the context before them), appends
        their text to ``seq.output_text`` and moves the offsets past them. ``hold_partial``:
        emit nothing while the text ends in an unfinished character (or adds none)."""
        assert seq.tokens is not None
        to_string = self.tokenizer.convert_tokens_to_string
        prefix = to_string(seq.tokens[seq.prefix_offset:seq.read_offset])
        full = to_string(seq.tokens[seq.prefix_offset:])
        if hold_partial and (len(full) <= len(prefix) or full.endswith("\ufffd")):
            return ""
        delta = full[len(prefix):]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(seq.tokens)
        seq.output_text += delta
        return delta


def decode_new_text(tokenizer: Any, seq: Sequence, skip_special_tokens: bool) -> str:
    """``Detokenizer(tokenizer).decode_new_text(seq, skip_special_tokens)``: for one-off use
    (the engine keeps one :class:`Detokenizer`)."""
    return Detokenizer(tokenizer).decode_new_text(seq, skip_special_tokens)


def flush_text(tokenizer: Any, seq: Sequence) -> str:
    """``Detokenizer(tokenizer).flush_text(seq)``: for one-off use (the engine keeps one
    :class:`Detokenizer`)."""
    return Detokenizer(tokenizer).flush_text(seq)


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
