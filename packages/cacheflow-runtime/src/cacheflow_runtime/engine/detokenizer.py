"""Incremental detokenization and the stop checks that depend on the text.

Tokens are decoded a few at a time with some context before them, so that multi-byte characters
and tokenizers that merge spaces produce the same text as decoding everything at once.
"""

from __future__ import annotations

from typing import Any, Optional

from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.sequence import Sequence, SequenceStatus

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


def check_stop(seq: Sequence, params: SamplingParams, new_text: str,
               eos_token_id: Optional[int], max_model_len: int) -> None:
    """Sets a finished status on ``seq`` if its newest token ends it (and cuts stop strings)."""
    token = seq.get_last_token_id()
    if seq.get_output_len() >= params.min_tokens:
        if not params.ignore_eos and token == eos_token_id:
            seq.status = SequenceStatus.FINISHED_STOPPED
            return
        if token in params.stop_token_ids:
            seq.status = SequenceStatus.FINISHED_STOPPED
            seq.stop_reason = token
            return
        if new_text and _cut_stop_string(seq, params, len(new_text)):
            seq.status = SequenceStatus.FINISHED_STOPPED
            return
    if ((params.max_tokens is not None and seq.get_output_len() >= params.max_tokens)
            or seq.get_len() >= max_model_len):
        seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED


def _cut_stop_string(seq: Sequence, params: SamplingParams, new_len: int) -> bool:
    text = seq.output_text
    for stop in params.stop_strings:
        # Only a match that ends inside the new text is new.
        start = max(len(text) - new_len - len(stop) + 1, 0)
        idx = text.find(stop, start)
        if idx != -1:
            end = idx + len(stop) if params.include_stop_str_in_output else idx
            seq.output_text = text[:end]
            seq.stop_reason = stop
            return True
    return False


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
