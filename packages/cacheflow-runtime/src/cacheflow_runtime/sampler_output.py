"""The sampler's results between the device and the host.

``Sampler.sample`` only queues device work and returns a :class:`DeviceSamples`: the chosen
tokens and logprobs as device tensors plus what the host already knows about each sample.
``start_copy`` queues their copy to pinned host memory behind an event; ``assemble`` waits for
it (the step's one device-to-host synchronisation) and builds the ``GroupSampleResult``s. In
between, the host is free to prepare the next step while the device works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from cacheflow_runtime.sampling_metadata import (
    GroupSampleResult,
    Logprob,
    Logprobs,
    SampleResult,
    SamplingGroup,
)


@dataclass
class SampleRow:
    """One sample to report: which gathered row it came from and which sequence it extends."""

    group: int
    row: int  # index into the gathered rows
    parent_seq_id: int
    parent_cumulative: float


@dataclass
class BeamBucket:
    """The beam search candidates of groups with the same number of beams and width:
    ``flat[i]`` holds group ``groups[i]``'s best ``beam * vocab + token`` indices, best first."""

    groups: list[int]
    flat: torch.Tensor


@dataclass
class PromptLogprobsOnDevice:
    """One group's prompt logprobs: for each of ``targets`` its logprob and the top ``k``."""

    group: int
    targets: list[int]
    k: int
    chosen: torch.Tensor
    top_values: Optional[torch.Tensor]
    top_ids: Optional[torch.Tensor]
    rank: Optional[torch.Tensor] = None


@dataclass
class DeviceSamples:
    """What one sampler call chose, still on the device.

    ``tokens`` and ``chosen`` hold one entry per sample: first those of ``samples`` (greedy and
    random, known on the host), then the beam candidates of each of ``beams`` in order (whose
    rows are known only once ``flat`` is read). ``top_values`` / ``top_ids`` are the top
    ``max(num_top)`` logprobs of every gathered row (None when no row asks for them).
    ``decode_tokens`` / ``decode_chosen``: the token and its logprob of each columnar decode row
    (``sampling_metadata.DecodeRows``), None without such rows. ``chosen_rank``: the rank of
    each of ``chosen`` in its row, where a group asks for logprobs (else None).
    """

    groups: list[SamplingGroup]
    first_rows: list[int]
    vocab: int
    samples: list[SampleRow]
    beams: list[BeamBucket]
    tokens: torch.Tensor
    chosen: torch.Tensor
    num_top: list[int]
    top_values: Optional[torch.Tensor]
    top_ids: Optional[torch.Tensor]
    prompt: list[PromptLogprobsOnDevice] = field(default_factory=list)
    decode_tokens: Optional[torch.Tensor] = None
    decode_chosen: Optional[torch.Tensor] = None
    chosen_rank: Optional[torch.Tensor] = None
    _event: Optional[torch.cuda.Event] = None

    @classmethod
    def of_decodes(cls, tokens: torch.Tensor, chosen: torch.Tensor, vocab: int) -> DeviceSamples:
        """The samples of a step that has only columnar decode rows."""
        none = tokens[:0]
        return cls(groups=[], first_rows=[], vocab=vocab, samples=[], beams=[], tokens=none,
                   chosen=chosen[:0], num_top=[], top_values=None, top_ids=None,
                   decode_tokens=tokens, decode_chosen=chosen)

    @property
    def all_tokens(self) -> torch.Tensor:
        """The sampled token ids on the device: the decode rows' first, then ``tokens``."""
        if self.decode_tokens is None:
            return self.tokens
        if not self.samples and not self.beams:
            return self.decode_tokens
        return torch.cat([self.decode_tokens, self.tokens])

    def start_copy(self) -> None:
        """Queues the copy of every result tensor to pinned host memory (nothing on the CPU)."""
        if not self.tokens.is_cuda:
            return
        self.decode_tokens = _to_host(self.decode_tokens)
        self.decode_chosen = _to_host(self.decode_chosen)
        self.tokens, self.chosen = _to_host(self.tokens), _to_host(self.chosen)
        self.chosen_rank = _to_host(self.chosen_rank)
        self.top_values, self.top_ids = _to_host(self.top_values), _to_host(self.top_ids)
        for bucket in self.beams:
            bucket.flat = _to_host(bucket.flat)
        for p in self.prompt:
            p.chosen, p.rank = _to_host(p.chosen), _to_host(p.rank)
            p.top_values, p.top_ids = _to_host(p.top_values), _to_host(p.top_ids)
        self._event = torch.cuda.Event()
        self._event.record()

    def ready(self) -> bool:
        """Whether the copies queued by :meth:`start_copy` are done (never blocks)."""
        return self._event is None or self._event.query()

    def assemble_decodes(self) -> tuple[list[int], list[float]]:
        """Waits for the results and returns the token and its logprob of each columnar decode
        row (empty lists without such rows)."""
        if self._event is not None:
            self._event.synchronize()
        if self.decode_tokens is None or self.decode_chosen is None:
            return [], []
        return self.decode_tokens.tolist(), self.decode_chosen.tolist()

    def assemble(self) -> list[GroupSampleResult]:
        """Waits for the results and builds one ``GroupSampleResult`` per group (samples in the
        order they were drawn: greedy, random, beam candidates)."""
        if self._event is not None:
            self._event.synchronize()
        if not self.groups:
            return []
        samples = self.samples + self._beam_samples()
        top_values = self.top_values.tolist() if self.top_values is not None else []
        top_ids = self.top_ids.tolist() if self.top_ids is not None else []
        results = [GroupSampleResult(samples=[]) for _ in self.groups]
        chosen = self.chosen.tolist()
        ranks = (self.chosen_rank.tolist() if self.chosen_rank is not None
                 else [None] * len(chosen))
        for sample, token, logprob, rank in zip(samples, self.tokens.tolist(), chosen, ranks):
            k = self.num_top[sample.row]
            results[sample.group].samples.append(SampleResult(
                parent_seq_id=sample.parent_seq_id,
                token_id=token,
                logprobs=logprobs_dict(token, logprob, k, top_values[sample.row] if k else [],
                                       top_ids[sample.row] if k else [], rank),
                cumulative_logprob=sample.parent_cumulative + logprob,
            ))
        for p in self.prompt:
            results[p.group].prompt_logprobs = _prompt_logprobs(p)
        return results

    def _beam_samples(self) -> list[SampleRow]:
        samples = []
        for bucket in self.beams:
            for g, top in zip(bucket.groups, bucket.flat.tolist()):
                group = self.groups[g]
                for i in top:
                    beam = i // self.vocab
                    samples.append(SampleRow(g, self.first_rows[g] + beam, group.seq_ids[beam],
                                             cumulative_logprob_of(group, beam)))
        return samples


def cumulative_logprob_of(group: SamplingGroup, j: int) -> float:
    """The cumulative logprob of the group's j-th sequence (0 when not given)."""
    return float(group.cumulative_logprobs[j]) if j < len(group.cumulative_logprobs) else 0.0


def logprobs_dict(token: int, logprob: float, k: int, top_values: list[float],
                  top_ids: list[int], rank: Optional[int] = None) -> Logprobs:
    """The chosen token's logprob plus the top k (ranked 1 to k). With the chosen token's
    ``rank`` (the request asked for logprobs) the values are ``Logprob`` objects, else plain
    floats (only the chosen one is read: cumulative logprobs)."""
    if rank is None:
        result: Logprobs = {token: logprob}
        for t, v in zip(top_ids[:k], top_values[:k]):
            result[t] = v
        return result
    result = {token: Logprob(logprob, rank)}
    for i, (t, v) in enumerate(zip(top_ids[:k], top_values[:k])):
        result[t] = Logprob(v, i + 1)
    return result


def _prompt_logprobs(p: PromptLogprobsOnDevice) -> list[Logprobs | None]:
    values = p.top_values.tolist() if p.top_values is not None else []
    ids = p.top_ids.tolist() if p.top_ids is not None else []
    ranks = p.rank.tolist() if p.rank is not None else [None] * len(p.targets)
    return [logprobs_dict(token, logprob, p.k, values[i] if p.k else [], ids[i] if p.k else [],
                          rank)
            for i, (token, logprob, rank) in enumerate(zip(p.targets, p.chosen.tolist(), ranks))]


def _to_host(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A pinned host tensor that receives ``tensor`` once the device's queued work is done."""
    if tensor is None:
        return None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
