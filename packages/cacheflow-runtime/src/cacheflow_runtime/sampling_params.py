"""Sampling parameters of one request, validated on construction."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from cacheflow_runtime.config import is_int, is_number
from cacheflow_runtime.errors import InvalidArgumentError

_GREEDY_EPS = 1e-5

# Fields by type, checked before any range (bool is not accepted as an int or a float).
_INT_FIELDS = ("n", "top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("best_of", "seed", "max_tokens", "logprobs", "prompt_logprobs",
                        "truncate_prompt_tokens")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "length_penalty")
_BOOL_FIELDS = ("ignore_eos", "use_beam_search", "early_stopping", "include_stop_str_in_output",
                "skip_special_tokens", "spaces_between_special_tokens", "detokenize")


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise InvalidArgumentError(f"SamplingParams.{name} must be {allowed}, got {value!r}",
                                   field=f"SamplingParams.{name}", value=value)


def _string_list(value: Any, name: str, single_allowed: bool = True) -> list[str]:
    """``value`` (a string where ``single_allowed``, or a list of strings) as a list of
    non-empty, valid-Unicode strings (InvalidArgumentError naming ``name`` if not)."""
    allowed = ("a non-empty string or a list of non-empty strings" if single_allowed
               else "a list of non-empty strings")
    items = [value] if isinstance(value, str) and single_allowed else value
    if value is None:
        return []
    _check(isinstance(items, (list, tuple)) and all(isinstance(s, str) and s for s in items),
           name, allowed, value)
    for s in items:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            _check(False, name, f"{allowed} of valid Unicode (no lone surrogates)", value)
    return list(items)


@dataclass
class SamplingParams:
    """How to pick the tokens of one request (the names follow vLLM and the OpenAI API).

    temperature 0 means greedy. ``best_of`` sequences are generated and the ``n`` with the highest
    cumulative log probability are returned; with ``use_beam_search`` the ``best_of`` beams are
    ranked by ``length_penalty`` like HF transformers' beam search. ``logprobs=k`` returns the
    chosen token's log probability and the top k; ``prompt_logprobs=k`` does the same for every
    prompt token after the first. ``detokenize=False`` returns token ids with empty texts (no
    decoding time; stop strings, which are matched in the text, are then refused).
    ``spaces_between_special_tokens`` is vLLM's field: the fast (Rust) tokenizers cacheflow loads
    join special tokens as they decode them either way, as vLLM's fast-tokenizer path does.
    ``seed=-1`` means no seed, as in vLLM; ``clone()`` is a deep copy.
    ``allowed_token_ids`` restricts every step's choice to those ids (vLLM's field: the other
    logits become -inf first). ``logit_bias`` then adds a bias in [-100, 100] to the logits of
    the ids it names, before the penalties (OpenAI's field: -100 bans a token, +100 all but
    forces it). The reported log probabilities include both. ``bad_words`` are never generated:
    the last token of a word's tokens (with and without a leading space) is masked whenever the
    output ends with the tokens before it (vLLM's field). ``truncate_prompt_tokens=k`` keeps the
    last k prompt tokens (-1: the last ``max_model_len``), as vLLM's field does.
    """

    n: int = 1
    best_of: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off (0 becomes -1)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Optional[Sequence[str] | str] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[Sequence[int]] = None
    bad_words: Optional[Sequence[str]] = None
    truncate_prompt_tokens: Optional[int] = None
    _stop_list: list[str] = field(init=False, repr=False)
    #: The token id sequences of ``bad_words``, set by the engine from its tokenizer.
    bad_words_token_ids: list[list[int]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._check_types()
        if self.seed == -1:  # vLLM's "no seed"
            self.seed = None
        if self.best_of is None:
            self.best_of = self.n
        self._stop_list = _string_list(self.stop, "stop")
        self.stop = list(self._stop_list)  # vLLM's: always a list (None and one string too)
        self.bad_words = _string_list(self.bad_words, "bad_words", single_allowed=False) or None
        self._validate()

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's method), to vary per-prompt parameters."""
        return copy.deepcopy(self)

    def _check_types(self) -> None:
        """InvalidArgumentError naming the first field of the wrong type (numpy integers are
        taken and become int)."""
        for name in _INT_FIELDS + _OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INT_FIELDS:
                continue
            _check(is_int(value), name, "an integer" + (" or None" if name in
                                                         _OPTIONAL_INT_FIELDS else ""), value)
            setattr(self, name, int(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            _check(is_number(value), name, "a number", value)
        for name in _BOOL_FIELDS:
            _check(isinstance(getattr(self, name), bool), name, "True or False",
                   getattr(self, name))
        ids = self.stop_token_ids
        _check(ids is None or (isinstance(ids, (list, tuple)) and all(is_int(t) for t in ids)),
               "stop_token_ids", "a list of integer token ids", ids)
        self.stop_token_ids = [int(t) for t in ids or []]
        bias = self.logit_bias
        _check(bias is None or (isinstance(bias, dict)
                                and all(is_int(t) and is_number(v) for t, v in bias.items())),
               "logit_bias", "None or a dict of integer token id -> number", bias)
        self.logit_bias = {int(t): float(v) for t, v in bias.items()} if bias else None
        allowed = self.allowed_token_ids
        _check(allowed is None or (isinstance(allowed, (list, tuple)) and len(allowed) > 0
                                   and all(is_int(t) for t in allowed)),
               "allowed_token_ids", "None or a non-empty list of integer token ids", allowed)
        self.allowed_token_ids = [int(t) for t in allowed] if allowed is not None else None

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings as a list."""
        return self._stop_list

    def truncate_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt tokens ``truncate_prompt_tokens`` keeps (``keep_prompt_tail``)."""
        return keep_prompt_tail(token_ids, self.truncate_prompt_tokens, max_model_len)

    @property
    def is_greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0, no beam search)."""
        return self.temperature < _GREEDY_EPS and not self.use_beam_search

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(isinstance(self.best_of, int) and self.best_of >= self.n, "best_of",
               f"an integer >= n ({self.n})", self.best_of)
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
               "a finite number >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k",
               "-1 or 0 (off) or an integer >= 1", self.top_k)
        if self.top_k == 0:  # vLLM and HF generation configs: 0 is off too; -1 downstream
            self.top_k = -1
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]",
               self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]",
               self.frequency_penalty)
        _check(0 < self.repetition_penalty < math.inf, "repetition_penalty",
               "a finite number > 0", self.repetition_penalty)
        _check(self.seed is None or isinstance(self.seed, int), "seed", "an integer or None",
               self.seed)
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "non-negative token ids", self.stop_token_ids)
        _check(not self.logit_bias or all(t >= 0 and math.isfinite(v) and -100 <= v <= 100
                                          for t, v in self.logit_bias.items()),
               "logit_bias", "a dict of non-negative token ids to biases in [-100, 100]",
               self.logit_bias)
        _check(self.allowed_token_ids is None or all(t >= 0 for t in self.allowed_token_ids),
               "allowed_token_ids", "non-negative token ids", self.allowed_token_ids)
        _check(self.max_tokens is None
               or (isinstance(self.max_tokens, int) and self.max_tokens >= 1), "max_tokens",
               "an integer >= 1 or None", self.max_tokens)
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0
               and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
               "min_tokens", "an integer in [0, max_tokens]", self.min_tokens)
        _check(self.logprobs is None
               or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs",
               "None or an integer in [0, 20]", self.logprobs)
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
               "prompt_logprobs", "None or an integer in [0, 20]", self.prompt_logprobs)
        _check(math.isfinite(self.length_penalty), "length_penalty", "a finite number",
               self.length_penalty)
        _check(self.truncate_prompt_tokens is None or self.truncate_prompt_tokens == -1
               or self.truncate_prompt_tokens >= 1, "truncate_prompt_tokens",
               "None, -1 (max_model_len) or an integer >= 1", self.truncate_prompt_tokens)
        _check(self.detokenize or not self._stop_list, "stop",
               "None with detokenize=False (stop strings are matched in the text)", self.stop)
        if self.use_beam_search:
            _check(self.best_of > 1, "best_of", "> 1 with use_beam_search", self.best_of)
            _check(self.temperature < _GREEDY_EPS, "temperature", "0 with use_beam_search",
                   self.temperature)
            _check(self.top_p == 1.0 and self.top_k == -1 and self.min_p == 0.0,
                   "top_p/top_k/min_p", "off (1.0 / -1 / 0.0) with use_beam_search",
                   (self.top_p, self.top_k, self.min_p))
        else:
            _check(self.length_penalty == 1.0, "length_penalty", "1.0 unless use_beam_search",
                   self.length_penalty)
            if self.temperature < _GREEDY_EPS:
                self._check_greedy()

    def _check_greedy(self) -> None:
        """Greedy sampling makes one sequence: ``n`` (then ``best_of``, which defaults to n)
        must be 1, so that the error names the field the caller set."""
        _check(self.n == 1, "n", "1 with greedy sampling (temperature 0)", self.n)
        _check(self.best_of == 1, "best_of", "1 with greedy sampling (temperature 0)",
               self.best_of)


def keep_prompt_tail(token_ids: list[int], keep: Optional[int],
                     max_model_len: int) -> list[int]:
    """The last ``keep`` prompt tokens (the last ``max_model_len`` for -1, all for None), as
    ``truncate_prompt_tokens`` asks."""
    if keep is None:
        return token_ids
    _check(keep == -1 or (is_int(keep) and keep >= 1), "truncate_prompt_tokens",
           "None, -1 (max_model_len) or an integer >= 1", keep)
    return token_ids[-(max_model_len if keep == -1 else keep):]


def encode_bad_words(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """The token id sequences to keep out of the output for ``words``: each word as written
    and with one leading space (how it reads after another word), without special tokens,
    distinct sequences once."""
    sequences: list[list[int]] = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


@dataclass
class BeamSearchParams:
    """``LLM.beam_search``'s parameters (vLLM's names): ``beam_width`` beams ranked by
    ``length_penalty`` as HF transformers' beam search, each at most ``max_tokens`` long.
    ``temperature`` must be 0 (the search is deterministic)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def sampling_params(self) -> SamplingParams:
        """The same search as SamplingParams (``use_beam_search``; one beam: greedy)."""
        _check(is_int(self.beam_width) and self.beam_width >= 1, "beam_width",
               "a positive integer", self.beam_width)
        beams = int(self.beam_width)
        return SamplingParams(
            n=beams, best_of=beams, use_beam_search=beams > 1, temperature=self.temperature,
            max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
            length_penalty=self.length_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=0)
