"""What the sampler needs to know about each request in a batch, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cacheflow_runtime.sampling_params import SamplingParams


class Logprob(float):
    """A reported token's log probability: a float, with vLLM's fields besides.

    ``logprob`` is the value; ``rank`` the token's place in the vocabulary by probability (1:
    the most likely); ``decoded_token`` its text alone (None until the engine's output
    processing names it, and without a tokenizer or with ``detokenize=False``).
    """

    __slots__ = ("decoded_token", "rank")

    def __new__(cls, logprob: float, rank: Optional[int] = None,
                decoded_token: Optional[str] = None) -> Logprob:
        obj = super().__new__(cls, logprob)
        obj.rank = rank
        obj.decoded_token = decoded_token
        return obj

    @property
    def logprob(self) -> float:
        """The log probability, as a plain float."""
        return float(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return Logprob, (float(self), self.rank, self.decoded_token)

    def __repr__(self) -> str:
        return (f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, "
                f"decoded_token={self.decoded_token!r})")


#: token id -> log probability (a :class:`Logprob` where the engine reports it).
Logprobs = dict[int, float]


@dataclass
class SamplingGroup:
    """One request's share of a batch's logits.

    ``logit_rows`` are the rows of the batch's logits that belong to this request, one per sequence
    in ``seq_ids`` (at a prompt step: one row, the prompt's last position, and ``seq_ids`` holds the
    single prompt sequence). ``prompt_logit_rows`` (steps that compute prompt positions of a request
    with ``prompt_logprobs``) are the rows for prompt positions ``prompt_logprobs_start``,
    ``prompt_logprobs_start + 1``, ...; position p predicts prompt token p + 1.
    ``seed_keys[i]`` seeds the i-th sample's noise (seeded_noise.py): at a prompt step there are
    ``best_of`` of them (the children-to-be), at a decode step one per sequence; None means the
    sampler's default generator draws it.
    """

    seq_ids: list[int]
    sampling_params: SamplingParams
    is_prompt: bool
    logit_rows: list[int]
    prompt_token_ids: list[int]
    output_token_ids: list[list[int]]
    cumulative_logprobs: list[float]
    seed_keys: list[Optional[int]]
    prompt_logit_rows: list[int] = field(default_factory=list)
    prompt_logprobs_start: int = 0
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class DecodeRows:
    """The sampler's view of a step's columnar decodes (core/step_data.CachedDecodes): the
    first ``num_rows`` rows of the logits, one sequence each, none with penalties, top-k
    logprobs or beam search. Built once per batch composition: a step with the same requests as
    the one before reuses it, tensors included.

    ``temperature`` (``[num_rows, 1]`` float32 on the device, 1 for greedy rows) is None when
    every row is greedy. ``random_rows`` (long, on the device) are the rows drawn at random;
    ``top_k``, ``top_p`` and ``min_p`` hold one entry per such row, in order. ``seeded`` are the
    random rows (indices among them) with a seed key, ``seed_keys`` their keys and
    ``seeded_rows`` their rows (long tensors on the device; None without seeded rows); the
    others draw from the sampler's default generator.
    """

    num_rows: int
    temperature: Optional[torch.Tensor] = None
    random_rows: Optional[torch.Tensor] = None
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    seeded: list[int] = field(default_factory=list)
    seed_keys: Optional[torch.Tensor] = None
    seeded_rows: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, params: list[SamplingParams], seed_keys: list[Optional[int]],
              device: torch.device) -> DecodeRows:
        """The rows of requests with sampling parameters ``params[i]`` and seed key
        ``seed_keys[i]``, with tensors on ``device``."""
        rows = cls(num_rows=len(params))
        random = [i for i, sp in enumerate(params) if not sp.is_greedy]
        if not random:
            return rows
        temperature = [1.0] * len(params)
        seeded_rows = []
        for j, i in enumerate(random):
            sp = params[i]
            temperature[i] = sp.temperature
            rows.top_k.append(sp.top_k)
            rows.top_p.append(sp.top_p)
            rows.min_p.append(sp.min_p)
            if seed_keys[i] is not None:
                rows.seeded.append(j)
                seeded_rows.append(i)
        if seeded_rows:
            rows.seed_keys = _long_on([seed_keys[i] for i in seeded_rows], device)
            rows.seeded_rows = _long_on(seeded_rows, device)
        rows.temperature = torch.tensor(temperature, dtype=torch.float32).unsqueeze(1).to(
            device, non_blocking=True)
        rows.random_rows = _long_on(random, device)
        return rows


def _long_on(values: list[Any], device: torch.device) -> torch.Tensor:
    """A long tensor of ``values`` on ``device``."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


@dataclass
class SampleResult:
    """One new token for one sequence: ``parent_seq_id`` is the sequence it extends.

    ``logprobs`` maps token id -> log probability (after temperature, before top-k/top-p) for the
    chosen token plus the top ``SamplingParams.logprobs`` tokens.
    For beam search, ``cumulative_logprob`` is the parent's cumulative plus this token's logprob.
    """

    parent_seq_id: int
    token_id: int
    logprobs: Logprobs
    cumulative_logprob: float


@dataclass
class GroupSampleResult:
    """What the sampler chose for one request in one step.

    Random and greedy sampling: one ``SampleResult`` per sequence at a decode step (in ``seq_ids``
    order), ``best_of`` of them at the prompt step (all with the prompt sequence as parent).
    Beam search: the ``2 * best_of`` best candidates over all beams by cumulative logprob, best
    first (the engine's beam search keeps ``best_of`` of them, as HF transformers does).
    ``prompt_logprobs`` (prompt step with ``prompt_logprobs`` set): None for the first prompt token,
    then a dict per prompt token holding that token and the top-k.
    """

    samples: list[SampleResult]
    prompt_logprobs: Optional[list[Optional[Logprobs]]] = None
