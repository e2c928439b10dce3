"""What the engine returns for each request (the names vLLM users already know)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cacheflow_runtime.sequence import Logprobs, Sequence, SequenceGroup


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    ``logprobs`` (when asked for) holds, per generated token, a dict token id -> log probability
    with the chosen token and the top-k. ``finish_reason`` is "stop", "length", "abort" or None
    while still running; ``stop_reason`` is the stop string or stop token id that ended it.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: Optional[list[Logprobs]]
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None

    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after an engine step (final when ``finished``).

    ``num_cached_tokens``: prompt tokens served from the prefix cache (None before the request
    was first scheduled).
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[Logprobs]]]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: Optional[int] = None

    @classmethod
    def from_seq_group(cls, group: SequenceGroup) -> RequestOutput:
        """Builds the output of ``group``: its best ``n`` sequences, best first when finished."""
        params = group.sampling_params
        if params.use_beam_search and group.beam_hypotheses:
            seqs = [seq for _, seq in group.beam_hypotheses]
        else:
            seqs = group.get_seqs()
            if params.best_of > params.n or params.use_beam_search:
                seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        outputs = [_completion(i, seq, params.logprobs is not None)
                   for i, seq in enumerate(seqs[:params.n])]
        finished = group.is_finished() and (not params.use_beam_search or group.beam_search_done)
        return cls(request_id=group.request_id, prompt=group.prompt,
                   prompt_token_ids=group.prompt_token_ids,
                   prompt_logprobs=group.prompt_logprobs, outputs=outputs, finished=finished,
                   num_cached_tokens=group.num_cached_tokens)


def _completion(index: int, seq: Sequence, with_logprobs: bool) -> CompletionOutput:
    return CompletionOutput(index=index, text=seq.output_text,
                            token_ids=list(seq.output_token_ids),
                            cumulative_logprob=seq.cumulative_logprob,
                            logprobs=list(seq.output_logprobs) if with_logprobs else None,
                            finish_reason=seq.status.finish_reason, stop_reason=seq.stop_reason)
