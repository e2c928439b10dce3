"""The stop rules, in one place: when a new token ends a sequence, and where a stop string cuts
its text. Used by sampling, parallel sampling and beam search alike.

A sequence ended by the EOS token or a stop token id keeps that token in its token ids but not
in its text, unless ``include_stop_str_in_output`` (:func:`hides_stop_token`).

Order of precedence for a new token (all but the length limits only once ``min_tokens`` tokens
have been generated): the EOS token (unless ``ignore_eos``), a stop token id, a stop string in
the new text, then ``max_tokens`` and the model's length limit.
"""

from __future__ import annotations

from typing import Optional

from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.sequence import SequenceStatus


def token_stop(params: SamplingParams, token_id: int, output_len: int, total_len: int,
               eos_token_ids: frozenset[int], max_model_len: int,
               primary_eos: Optional[int] = None,
               ) -> Optional[tuple[SequenceStatus, Optional[int]]]:
    """Whether the token just generated ends its sequence, by its id or by a length limit.

    ``output_len`` and ``total_len`` count the token; ``eos_token_ids`` are the model's EOS
    ids, ``primary_eos`` the tokenizer's (or the config's first; None: every one is primary).
    Returns the finished status and the stop reason, or None if it goes on. The reason is the
    token id for a stop token id and for an EOS id other than the primary one (vLLM counts a
    generation config's other EOS ids as stop token ids), None for the primary EOS and for
    length limits.
    """
    if output_len >= params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            primary = primary_eos is None or token_id == primary_eos
            return SequenceStatus.FINISHED_STOPPED, None if primary else token_id
        if token_id in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED, token_id
    if length_capped(params, output_len, total_len, max_model_len):
        return SequenceStatus.FINISHED_LENGTH_CAPPED, None
    return None


def hides_stop_token(params: SamplingParams, status: SequenceStatus) -> bool:
    """Whether a sequence that ``token_stop`` ended with ``status`` leaves its last token out of
    its text: the EOS or stop token id that stopped it, unless ``include_stop_str_in_output``
    (as vLLM does; the token stays in the token ids and logprobs)."""
    return status is SequenceStatus.FINISHED_STOPPED and not params.include_stop_str_in_output


class StopRule:
    """The token stop rules of one request reduced to two cheap tests, for the per-token path.

    ``token_stop`` can end a sequence of the request only when the new token is one of
    ``token_ids`` (the stop token ids, and the EOS tokens unless ``ignore_eos``) or the output has
    reached ``max_output_len`` tokens (``max_tokens``, or the model's length limit less the
    prompt): when :meth:`may_stop` is False it returns None, and :meth:`length_capped` is
    :func:`length_capped` for the request's sequences.
    """

    __slots__ = ("max_output_len", "token_ids")

    def __init__(self, params: SamplingParams, prompt_len: int, eos_token_ids: frozenset[int],
                 max_model_len: int) -> None:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(eos_token_ids)
        self.token_ids: frozenset[int] = frozenset(ids)
        limit = max_model_len - prompt_len
        self.max_output_len = limit if params.max_tokens is None else min(params.max_tokens,
                                                                          limit)

    def may_stop(self, token_id: int, output_len: int) -> bool:
        """False when a new token ``token_id`` making ``output_len`` generated tokens certainly
        does not end its sequence (``token_stop`` would return None)."""
        return output_len >= self.max_output_len or token_id in self.token_ids

    def length_capped(self, output_len: int) -> bool:
        """Whether a sequence of the request with ``output_len`` generated tokens has reached
        ``max_tokens`` or the model's length limit."""
        return output_len >= self.max_output_len


def length_capped(params: SamplingParams, output_len: int, total_len: int,
                  max_model_len: int) -> bool:
    """Whether a sequence with ``output_len`` generated and ``total_len`` tokens in all has
    reached ``max_tokens`` or the model's length limit (it ends whatever its last token is)."""
    return ((params.max_tokens is not None and output_len >= params.max_tokens)
            or total_len >= max_model_len)


def find_stop_string(text: str, new_len: int, params: SamplingParams,
                     ) -> Optional[tuple[str, int]]:
    """The first stop string that ends inside the last ``new_len`` characters of ``text``, and
    where the text is cut for it (after the stop string with ``include_stop_str_in_output``,
    else before it); None if there is none."""
    for stop in params.stop_strings:
        start = max(len(text) - new_len - len(stop) + 1, 0)
        idx = text.find(stop, start)
        if idx != -1:
            return stop, idx + len(stop) if params.include_stop_str_in_output else idx
    return None
