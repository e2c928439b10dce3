"""The one seam between the engine core and whoever runs the model: plain, picklable data.

Each step the scheduler emits a :class:`SchedulerOutput`; a worker (in this process, in another
process, or on another machine) applies it to the state it keeps per request and sequence, runs
the model and returns a :class:`ModelRunnerOutput`. No live engine object crosses the seam:
sampling parameters travel once, when a request is first scheduled, and afterwards only what
changed (new tokens, new KV blocks) does. The worker forgets a request when it appears in
``finished_req_ids`` and a sequence when it appears in ``freed_seq_ids``.

With asynchronous scheduling the engine sends step k+1 before it has read the tokens of step k:
a sequence's newest token may then be :data:`PLACEHOLDER_TOKEN_ID`, which stands for the token
the worker itself sampled for that sequence in the step it ran just before. Workers run steps
in the order they are sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cacheflow_runtime.sampling_metadata import GroupSampleResult, Logprobs
from cacheflow_runtime.sampling_params import SamplingParams

#: A token id that stands for the token sampled for the same sequence in the previous step,
#: not yet known to the engine (asynchronous scheduling); never a real token id.
PLACEHOLDER_TOKEN_ID = -1


@dataclass
class NewRequestData:
    """What a worker keeps for the whole life of a request, sent the first time it is scheduled.

    ``seed`` is the request's sampling seed (None: the worker's default generator draws); the
    worker derives one seed key per sample (``best_of`` of them) from it (seeded_noise.py).
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class ScheduledSequence:
    """One sequence's share of a step.

    ``token_ids`` are the tokens whose K/V this step computes; the first sits at position
    ``num_computed_tokens``. The last may be :data:`PLACEHOLDER_TOKEN_ID` (a decode scheduled
    before the previous step's token was read): the worker puts its own sample there.
    The worker's copy of the sequence's block table is replaced by ``block_ids`` when that is
    not None (first sight, a swap-in, a preemption, copy-on-write) and then extended by
    ``new_block_ids``. Its copy of the generated tokens (for penalties) is replaced by
    ``output_token_ids`` when that is not None and then extended by ``new_output_token_ids``;
    it holds only tokens the engine has read (never a placeholder), so in a step scheduled ahead
    it lacks the previous step's token. ``sample_index`` picks which of the request's
    per-sample seed keys seeds this sequence's tokens.
    """

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int
    new_block_ids: list[int] = field(default_factory=list)
    block_ids: Optional[list[int]] = None
    new_output_token_ids: list[int] = field(default_factory=list)
    output_token_ids: Optional[list[int]] = None
    sample_index: int = 0
    cumulative_logprob: float = 0.0


@dataclass
class ScheduledRequest:
    """One request's sequences in a step.

    ``do_sample``: the step reaches the end of every sequence's tokens, so a token is sampled for
    each (False for a prompt chunk that is not the last). ``is_first_sample``: this is the
    request's first sampling step (the end of its prompt): ``best_of`` samples (or the beam search
    candidates) come from the single prompt row.
    """

    req_id: str
    seqs: list[ScheduledSequence]
    do_sample: bool
    is_first_sample: bool = False


def decodes_by_columns(params: SamplingParams) -> bool:
    """Whether a request's decodes can travel in :class:`CachedDecodes`: its next token needs
    nothing the worker would have to track per token (one sequence, no beam search, no
    penalties, no ``min_tokens`` or ``bad_words`` masking, no logit bias or allowed token ids,
    no logprobs, whose ranks the columns do not carry, no prompt logprobs)."""
    return (params.best_of == 1 and not params.use_beam_search and params.logprobs is None
            and params.prompt_logprobs is None and params.min_tokens == 0
            and not params.logit_bias and params.allowed_token_ids is None
            and not params.bad_words
            and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0)


@dataclass
class CachedDecodes:
    """The decodes of requests the worker already runs, as columns: the bulk of a large decode
    step, without an object per sequence. Only requests for which :func:`decodes_by_columns`
    holds go here, so the worker keeps no output tokens for them while they do.

    Row i: sequence ``seq_ids[i]``, the only one of request ``req_ids[i]``, computes the token
    ``token_ids[i]`` (possibly :data:`PLACEHOLDER_TOKEN_ID`) at position
    ``num_computed_tokens[i]`` and samples its next token. ``new_blocks`` holds
    ``(i, block ids)`` for the rows whose block table grew (appended to the worker's copy).
    """

    req_ids: list[str] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    new_blocks: list[tuple[int, list[int]]] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """Everything a worker needs for one step: the columnar ``decodes`` first, then the
    requests of ``scheduled`` (the batch's rows come in that order).

    Block moves happen before the model runs, in this order: swap-in, swap-out, copy (each a list
    of (source block, destination block) pairs; swap pairs are (cpu, device) for swap-in and
    (device, cpu) for swap-out).
    """

    new_requests: list[NewRequestData] = field(default_factory=list)
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    freed_seq_ids: list[int] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    decodes: CachedDecodes = field(default_factory=CachedDecodes)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens computed in this step (the step's share of the token budget)."""
        return len(self.decodes.seq_ids) + sum(len(seq.token_ids) for req in self.scheduled
                                               for seq in req.seqs)

    def tokens_per_request(self) -> dict[str, int]:
        """The tokens each scheduled request computes in this step, in the batch's order."""
        counts = dict.fromkeys(self.decodes.req_ids, 1)
        for req in self.scheduled:
            counts[req.req_id] = sum(len(seq.token_ids) for seq in req.seqs)
        return counts

    def is_empty(self) -> bool:
        """True when no model work and no block move is asked for."""
        return not (self.scheduled or self.decodes.seq_ids or self.blocks_to_swap_in
                    or self.blocks_to_swap_out or self.blocks_to_copy)


@dataclass
class ModelRunnerOutput:
    """What a worker returns for one step.

    ``samples`` maps each sampled request of ``scheduled`` (``do_sample``) to its new tokens;
    ``decode_token_ids[i]`` is the token sampled for row i of the step's ``decodes`` and
    ``decode_logprobs[i]`` its logprob.
    ``prompt_logprobs`` maps each request that asked for them to this step's share, in prompt
    order: the request's first share starts with None (the first prompt token has no logprob).
    """

    samples: dict[str, GroupSampleResult] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[Optional[Logprobs]]] = field(default_factory=dict)
    decode_token_ids: list[int] = field(default_factory=list)
    decode_logprobs: list[float] = field(default_factory=list)
