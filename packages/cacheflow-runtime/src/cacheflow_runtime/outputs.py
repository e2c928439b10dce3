"""What the engine returns for each request (the names vLLM users already know)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cacheflow_runtime.sampling_metadata import Logprobs
from cacheflow_runtime.sequence import Sequence, SequenceGroup


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    ``logprobs`` (when asked for) holds, per generated token, a dict token id -> ``Logprob`` (a
    float with vLLM's ``logprob``, ``rank`` and ``decoded_token``) with the chosen token and the
    top-k. ``finish_reason`` is "stop", "length", "abort" or None
    while still running; ``stop_reason`` is the stop string or stop token id that ended it.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: Optional[list[Logprobs]]
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None

    lora_request = None

    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after an engine step (final when ``finished``).

    ``num_cached_tokens``: prompt tokens served from the prefix cache (None before the request
    was first scheduled). ``metrics``: when the request arrived (in the engine) and got its first
    token (``time.monotonic()`` seconds; vLLM's field). ``lora_request`` is None (no
    adapters).
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[Logprobs]]]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: Optional[int] = None
    arrival_time: Optional[float] = None
    first_token_time: Optional[float] = None

    lora_request = None

    @property
    def metrics(self) -> RequestMetrics:
        """The request's timings so far."""
        return RequestMetrics(self.arrival_time, self.first_token_time)

    @classmethod
    def from_seq_group(cls, group: SequenceGroup) -> RequestOutput:
        """Builds the output of ``group``: its best ``n`` sequences, best first when finished."""
        params = group.sampling_params
        with_logprobs = params.logprobs is not None
        seqs = group.seqs
        if params.use_beam_search and group.beam_hypotheses:
            seqs = [seq for _, seq in group.beam_hypotheses]
        elif params.best_of > params.n or params.use_beam_search:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        if len(seqs) == 1:  # the common case (n == 1): no slice, no enumerate
            outputs = [_completion(0, seqs[0], with_logprobs)]
        else:
            outputs = [_completion(i, seq, with_logprobs)
                       for i, seq in enumerate(seqs[:params.n])]
        finished = request_finished(group)
        first = group.seqs[0]
        # Positional, in field order: a dataclass __init__ called with keywords costs twice as
        # much, and this runs per request and step.
        return cls(group.request_id, first.prompt, first.prompt_token_ids, group.prompt_logprobs,
                   outputs, finished, group.num_cached_tokens, group.arrival_time,
                   group.first_token_time)


@dataclass(frozen=True)
class RequestMetrics:
    """A request's timings (``time.monotonic()`` seconds; None until they happen)."""

    arrival_time: Optional[float]
    first_token_time: Optional[float]

    @property
    def time_to_first_token(self) -> Optional[float]:
        """Seconds from arrival to the first token."""
        if self.arrival_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


def request_finished(group: SequenceGroup) -> bool:
    """``RequestOutput.from_seq_group(group).finished``, without building the output."""
    return group.is_finished() and (not group.sampling_params.use_beam_search
                                    or group.beam_search_done)


def _completion(index: int, seq: Sequence, with_logprobs: bool) -> CompletionOutput:
    # Positional, in field order (see RequestOutput.from_seq_group).
    return CompletionOutput(index, seq.output_text, list(seq.output_token_ids),
                            seq.cumulative_logprob,
                            list(seq.output_logprobs) if with_logprobs else None,
                            seq.status.finish_reason, seq.stop_reason)


@dataclass
class BeamSearchSequence:
    """One beam of ``LLM.beam_search`` (vLLM's fields): ``tokens`` the prompt's and the
    generated ids, ``logprobs`` one entry per generated token, ``text`` all of ``tokens``
    decoded (None without a tokenizer)."""

    tokens: list[int]
    logprobs: list[Logprobs]
    cum_logprob: float
    text: Optional[str]
    finish_reason: Optional[str]
    stop_reason: Optional[int | str]


@dataclass
class BeamSearchOutput:
    """The beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]
