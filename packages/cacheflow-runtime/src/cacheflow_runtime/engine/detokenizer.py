"""Incremental detokenization, and how much of a running text a stream must hold back.

Tokens are decoded a few at a time with some context before them, so that multi-byte characters
and tokenizers that merge spaces produce the same text as decoding everything at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

from cacheflow_runtime.sequence import Sequence

# Tokens of context decoded before the new ones.
_CONTEXT_TOKENS = 5

# Where transformers defines the fast tokenizers (TokenizersBackend in 5.x,
# PreTrainedTokenizerFast in 4.x), whose methods below are known to do this, across versions:
# ``convert_tokens_to_string(tokens)`` is ``backend_tokenizer.decoder.decode(tokens)`` when
# there is a decoder (else a join); ``convert_ids_to_tokens(ids, skip_special_tokens)`` is
# ``backend_tokenizer.id_to_token(id)`` for each id, less those in ``all_special_ids`` when
# skipping (a property computed again in every call). Their ``decode(ids, skip_special_tokens=
# True)`` drops more: every added token flagged special (see ``flagged_special_ids``).
_HF_FAST = {("transformers.tokenization_utils_tokenizers", "TokenizersBackend"),
            ("transformers.tokenization_utils_fast", "PreTrainedTokenizerFast")}


def _is_hf_fast_method(tokenizer: Any, name: str) -> bool:
    """Whether ``tokenizer``'s method ``name`` is the HF fast tokenizers' own (not overridden)."""
    method = getattr(type(tokenizer), name, None)
    qualname = getattr(method, "__qualname__", "")
    return (getattr(method, "__module__", None), qualname.rpartition(".")[0]) in _HF_FAST \
        and qualname.endswith("." + name)


def tokens_to_string_function(tokenizer: Any) -> Callable[[list[str]], str]:
    """``tokenizer.convert_tokens_to_string``, or what it calls when that is the HF fast
    tokenizers' own (their decoder's ``decode``: the same text without two property lookups in
    Python per call). The tokenizer's decoder must not change afterwards."""
    if _is_hf_fast_method(tokenizer, "convert_tokens_to_string"):
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if decoder is not None:
            return decoder.decode
    return tokenizer.convert_tokens_to_string


def converts_ids_one_by_one(tokenizer: Any) -> bool:
    """Whether ``tokenizer.convert_ids_to_tokens(ids, ...)`` is known to be the concatenation
    of its conversions of each id alone (the HF fast tokenizers' own method)."""
    return (_is_hf_fast_method(tokenizer, "convert_ids_to_tokens")
            and getattr(tokenizer, "backend_tokenizer", None) is not None)


def flagged_special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the added tokens that ``tokenizer`` flags special (``added_tokens_decoder``
    entries with ``special=True``); empty for a tokenizer without added tokens.

    HF ``decode(ids, skip_special_tokens=True)`` drops them all, while ``all_special_ids``
    (what ``convert_ids_to_tokens`` skips) may lack some: Llama-3's ``<|start_header_id|>`` and
    reserved tokens, SmolLM2's ``<file_sep>`` or ``<gh_stars>``."""
    try:
        added = getattr(tokenizer, "added_tokens_decoder", None)
    except NotImplementedError:  # transformers' base class for tokenizers without any
        return frozenset()
    if not isinstance(added, Mapping):
        return frozenset()
    return frozenset(int(i) for i, token in added.items() if getattr(token, "special", False))


def token_of_id_function(tokenizer: Any,
                         ) -> Callable[[int, bool], tuple[str, ...]]:
    """A function ``(token_id, skip_special_tokens) -> tuple(tokenizer.convert_ids_to_tokens(
    [token_id], skip_special_tokens=skip_special_tokens))``, except that skipping also drops
    the tokens of :func:`flagged_special_ids` (as ``tokenizer.decode`` does), and an id the
    tokenizer does not know (a model's vocabulary padded past the tokenizer's, as Qwen2.5's and
    Phi-3's) has no token, so no text (vLLM decodes it to ""); for the HF fast tokenizers' own
    method, without computing the special token ids again in each call. The tokenizer's
    vocabulary and special tokens must not change afterwards."""
    flagged = flagged_special_ids(tokenizer)
    if converts_ids_one_by_one(tokenizer):
        id_to_token = tokenizer.backend_tokenizer.id_to_token
        special = flagged | frozenset(tokenizer.all_special_ids)

        def hf_tokens_of(token_id: int, skip_special_tokens: bool) -> tuple[str, ...]:
            if skip_special_tokens and token_id in special:
                return ()
            token = id_to_token(token_id)
            return () if token is None else (token,)
        return hf_tokens_of

    def tokens_of(token_id: int, skip_special_tokens: bool) -> tuple[str, ...]:
        if skip_special_tokens and token_id in flagged:
            return ()
        return _known(tokenizer.convert_ids_to_tokens([token_id],
                                                      skip_special_tokens=skip_special_tokens))
    return tokens_of


def _known(tokens: Any) -> tuple[str, ...]:
    """The tokens a tokenizer gave for ids, without the None of ids it does not know."""
    return tuple(t for t in tokens if t is not None)


class Detokenizer:
    """Incremental detokenization of sequences with one tokenizer.

    What ``convert_ids_to_tokens([token_id], skip_special_tokens=...)`` gives for a generated
    token is remembered per token id (at most one entry per id of the vocabulary), so that a
    step costs one dict lookup per new token instead of a tokenizer call (an HF tokenizer
    recomputes its special token ids in every call that skips them). So is the text of a single
    token (the context of the next token in most steps), so that a step costs one
    ``convert_tokens_to_string`` call per new token instead of two. The tokenizer must not
    change while the detokenizer is in use.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # skip_special_tokens -> token id -> the tokens it converts to (none or one).
        self._token_strings: dict[bool, dict[int, tuple[str, ...]]] = {False: {}, True: {}}
        self._to_string = tokens_to_string_function(tokenizer)
        self._convert_id = token_of_id_function(tokenizer)
        # Whether a prompt's tokens can be looked up id by id in _token_strings.
        self._ids_one_by_one = converts_ids_one_by_one(tokenizer)
        self._flagged_special = flagged_special_ids(tokenizer)
        # token -> convert_tokens_to_string([token])
        self._token_texts: dict[str, str] = {}

    def decode_new_text(self, seq: Sequence, skip_special_tokens: bool,
                        max_tokens: Optional[int] = None) -> str:
        """Appends the text of ``seq``'s output tokens not decoded yet (of its
        ``num_text_outputs``; usually the newest one) to ``seq.output_text`` and returns it,
        one token after the other as a stream shows them; with ``max_tokens``, of at most that
        many of them (the rest stay for a later call).

        Returns "" while the new bytes do not yet form a whole character.
        """
        tokens = seq.tokens
        if tokens is None:
            tokens = self._start(seq, skip_special_tokens)
        done = seq.num_detokenized
        known = seq.num_text_outputs
        if known == done + 1:  # the common case
            token_id = seq.output_token_ids[done]
            seq.num_detokenized = known
            new = self._token_strings[skip_special_tokens].get(token_id)
            if new is None:
                new = self._tokens_of(token_id, skip_special_tokens)
            tokens += new
            return self._emit(seq, True)
        if max_tokens is not None:
            known = min(known, done + max_tokens)
        text = ""
        for i in range(done, known):
            seq.num_detokenized = i + 1
            tokens += self._tokens_of(seq.output_token_ids[i], skip_special_tokens)
            text += self._emit(seq, True)
        return text

    def decode_output(self, seq: Sequence, skip_special_tokens: bool) -> str:
        """Appends the text of ``seq``'s known output tokens not decoded yet to
        ``seq.output_text``, nothing held back, and returns it: for a finished sequence whose
        text nobody read while it ran, the text that :meth:`decode_new_text` token by token and
        then :meth:`flush_text` give (in one decoding when :meth:`decode_rest_at_once` can)."""
        text = self.decode_rest_at_once(seq, skip_special_tokens)
        if text is None:
            text = self.decode_new_text(seq, skip_special_tokens) + self.flush_text(seq)
        return text

    def decode_rest_at_once(self, seq: Sequence, skip_special_tokens: bool) -> Optional[str]:
        """:meth:`decode_output` in one decoding, or None (``seq`` unchanged) when that might
        not give the stream's text.

        Decoding in one piece gives the text of the stream because a decoder's text of tokens
        ``a + b``, ``a`` ending a character, is its text of ``a`` then its text of ``b`` (and
        ``b``'s first token has ``a``'s last ones as context either way). Invalid UTF-8 is where
        decoders are not so (a byte-fallback decoder replaces a whole run of bytes, a
        byte-level one each invalid stretch; a prompt may end inside a character), so a text
        with a replacement character, or whose context's text is not where it starts, must be
        decoded token by token.
        """
        tokens = seq.tokens
        if tokens is None:
            tokens = self._start(seq, skip_special_tokens)
        num_tokens = len(tokens)
        known = seq.num_text_outputs
        for token_id in seq.output_token_ids[seq.num_detokenized:known]:
            tokens += self._tokens_of(token_id, skip_special_tokens)
        start, read = seq.prefix_offset, seq.read_offset
        prefix = self._to_string(tokens[start:read])
        full = self._to_string(tokens[start:])
        if "\ufffd" in full or "\ufffd" in prefix or not full.startswith(prefix):
            del tokens[num_tokens:]
            return None
        seq.num_detokenized = known
        text = full[len(prefix):]
        seq.prefix_offset = read
        seq.read_offset = len(tokens)
        seq.output_text += text
        return text

    def _start(self, seq: Sequence, skip_special_tokens: bool) -> list[str]:
        """Sets up ``seq``'s tokens and offsets for its prompt (no output token decoded);
        returns its tokens."""
        if self._ids_one_by_one:
            tokens = []
            for token_id in seq.prompt_token_ids:
                tokens.extend(self._tokens_of(token_id, skip_special_tokens))
        else:
            ids = seq.prompt_token_ids
            if skip_special_tokens and self._flagged_special:
                ids = [i for i in ids if i not in self._flagged_special]
            tokens = list(_known(self.tokenizer.convert_ids_to_tokens(
                ids, skip_special_tokens=skip_special_tokens)))
        seq.tokens = tokens
        seq.read_offset = len(tokens)
        seq.prefix_offset = max(seq.read_offset - _CONTEXT_TOKENS, 0)
        seq.output_text = ""
        seq.num_detokenized = 0
        return tokens

    def flush_text(self, seq: Sequence) -> str:
        """Appends the text that ``decode_new_text`` still holds back (the bytes of a character
        the sequence never finished) to ``seq.output_text`` and returns it; for a finished
        sequence, so that its text is what decoding all its tokens at once gives (but where a
        byte-fallback decoder would turn characters already streamed into replacement ones:
        ``_held_text``)."""
        if seq.tokens is None or seq.read_offset >= len(seq.tokens):
            return ""
        return self._emit(seq, hold_partial=False)

    def _tokens_of(self, token_id: int, skip_special_tokens: bool) -> tuple[str, ...]:
        """The tokens of ``token_id`` (see :func:`token_of_id_function`), remembered."""
        known = self._token_strings[skip_special_tokens]
        tokens = known.get(token_id)
        if tokens is None:
            tokens = known[token_id] = self._convert_id(token_id, skip_special_tokens)
        return tokens

    def _emit(self, seq: Sequence, hold_partial: bool) -> str:
        """Decodes the tokens from ``read_offset`` on (with the context before them), appends
        their text to ``seq.output_text`` and moves the offsets past them. ``hold_partial``:
        emit nothing while the text ends in an unfinished character (or adds none)."""
        tokens = seq.tokens
        assert tokens is not None
        to_string = self._to_string
        start, read = seq.prefix_offset, seq.read_offset
        if read - start == 1:
            token = tokens[start]
            prefix = self._token_texts.get(token)
            if prefix is None:
                prefix = self._token_texts[token] = to_string([token])
        else:
            prefix = to_string(tokens[start:read])
        full = to_string(tokens[start:])
        if hold_partial and (len(full) <= len(prefix) or full.endswith("\ufffd")):
            return ""
        delta = full[len(prefix):]
        if not hold_partial and not full.startswith(prefix):
            delta = self._held_text(tokens, start, read)
        seq.prefix_offset = read
        seq.read_offset = len(tokens)
        seq.output_text += delta
        return delta


    def _held_text(self, tokens: list[str], start: int, read: int) -> str:
        """The text of the held tokens ``tokens[read:]`` (a finished sequence's unfinished
        character) where decoding them after their context changes the context's own text: a
        byte-fallback decoder replaces the whole run of byte tokens, the context's complete
        characters included. The context is shortened from its end (its last byte tokens go)
        until its text stays, so the held bytes alone become replacement characters and the
        text already streamed stands; with no context left, they are decoded alone."""
        held = tokens[read:]
        for cut in range(read - 1, start, -1):
            prefix = self._to_string(tokens[start:cut])
            full = self._to_string(tokens[start:cut] + held)
            if full.startswith(prefix):
                return full[len(prefix):]
        return self._to_string(held)


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
