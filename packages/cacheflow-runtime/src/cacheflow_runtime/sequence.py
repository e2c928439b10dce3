"""Sequences, sequence groups (one request) and their statuses."""

from __future__ import annotations

import copy
import enum
import time
from typing import TYPE_CHECKING, Optional

from cacheflow_runtime.core.step_data import PLACEHOLDER_TOKEN_ID
from cacheflow_runtime.sampling_metadata import Logprobs
from cacheflow_runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cacheflow_runtime.core.stop import StopRule


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        """True for the three finished statuses."""
        return self in FINISHED_STATUSES

    @property
    def finish_reason(self) -> Optional[str]:
        """The OpenAI finish_reason of a finished status ("stop", "length", "abort"), else None."""
        return _FINISH_REASON.get(self._value_)


#: The finished statuses. A tuple, not a set: membership then compares identities in C, where
#: a set would call the enum's Python-level __hash__ (this test runs several times per sequence
#: and step).
FINISHED_STATUSES = (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH_CAPPED,
                     SequenceStatus.FINISHED_ABORTED)
# Keyed by value: an enum member's own hash is a Python-level call (one per output per step).
_FINISH_REASON = {SequenceStatus.FINISHED_STOPPED.value: "stop",
                  SequenceStatus.FINISHED_LENGTH_CAPPED.value: "length",
                  SequenceStatus.FINISHED_ABORTED.value: "abort"}


class Sequence:
    """One token sequence: the prompt plus what has been generated for it so far."""

    def __init__(self, seq_id: int, prompt: Optional[str], prompt_token_ids: list[int],
                 block_size: int, sample_index: int = 0) -> None:
        self.seq_id = seq_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[Logprobs] = []
        self.cumulative_logprob = 0.0
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        # Which of the request's per-sample generators draws this sequence's tokens.
        self.sample_index = sample_index
        # Tokens whose K/V are already in the cache; the next step computes the rest.
        self.num_computed_tokens = 0
        # What the worker's copy of this sequence holds (see core/step_data.py).
        self.known_to_worker = False
        self.num_outputs_sent = 0
        # Incremental detokenization state (see engine.detokenizer): ``num_detokenized``
        # output tokens are in ``tokens`` and (all but held-back bytes) in ``output_text``.
        self.output_text = ""
        self.tokens: Optional[list[str]] = None
        self.prefix_offset = 0
        self.read_offset = 0
        self.num_detokenized = 0
        self.stop_reason: Optional[int | str] = None
        # Whether the text leaves out the last output token: the EOS or stop token id that
        # ended the sequence (core.stop.hides_stop_token).
        self.stop_token_hidden = False

    def append_token(self, token_id: int, logprobs: Logprobs) -> None:
        """Appends a generated token; ``logprobs`` must contain ``token_id``."""
        self.output_token_ids.append(token_id)
        self.output_logprobs.append(logprobs)
        self.cumulative_logprob += logprobs[token_id]

    def append_placeholder(self) -> None:
        """Appends :data:`PLACEHOLDER_TOKEN_ID` for a token sampled by a step still running
        (asynchronous scheduling); ``add_sample`` replaces it once it is read."""
        self.output_token_ids.append(PLACEHOLDER_TOKEN_ID)

    def add_sample(self, token_id: int, logprob: float, logprobs: Logprobs) -> int:
        """Puts a sampled token in place of the trailing placeholder, or after the outputs
        when there is none; ``logprobs`` must contain ``token_id``, whose logprob ``logprob``
        is. Returns the number of output tokens."""
        outputs = self.output_token_ids
        output_logprobs = self.output_logprobs
        if len(outputs) > len(output_logprobs):  # self.has_placeholder
            outputs[-1] = token_id
        else:
            outputs.append(token_id)
        output_logprobs.append(logprobs)
        self.cumulative_logprob += logprob
        return len(outputs)

    @property
    def has_placeholder(self) -> bool:
        """True while the newest output token is a placeholder (its logprobs are not known)."""
        return len(self.output_token_ids) > len(self.output_logprobs)

    @property
    def num_known_outputs(self) -> int:
        """Output tokens whose ids are known (all but a trailing placeholder)."""
        return len(self.output_logprobs)

    @property
    def num_text_outputs(self) -> int:
        """Known output tokens that the text holds: all but a hidden stop token
        (``stop_token_hidden``)."""
        return len(self.output_logprobs) - self.stop_token_hidden

    def get_len(self) -> int:
        """Prompt plus output length in tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def get_output_len(self) -> int:
        """Number of generated tokens."""
        return len(self.output_token_ids)

    def get_token_ids(self) -> list[int]:
        """All token ids, prompt first."""
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids ``start .. end - 1`` of the prompt-then-output sequence."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    def get_last_token_id(self) -> int:
        """The newest token id."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_blocks_needed(self) -> int:
        """How many KV blocks hold all of this sequence's tokens."""
        return (self.get_len() + self.block_size - 1) // self.block_size

    def is_finished(self) -> bool:
        """True once the sequence has a finished status."""
        return self.status in FINISHED_STATUSES

    def fork(self, new_seq_id: int, sample_index: int = 0) -> Sequence:
        """A copy of this sequence under a new id (the block manager must fork its blocks too)."""
        child = copy.copy(self)
        child.seq_id = new_seq_id
        child.prompt_token_ids = self.prompt_token_ids  # shared, never mutated
        child.output_token_ids = list(self.output_token_ids)
        child.output_logprobs = list(self.output_logprobs)
        child.tokens = None if self.tokens is None else list(self.tokens)
        child.sample_index = sample_index
        child.known_to_worker = False
        child.num_outputs_sent = 0
        return child

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, status={self.status.name}, "
                f"num_tokens={self.get_len()})")


class SequenceGroup:
    """The sequences generated from one prompt: one request."""

    def __init__(self, request_id: str, seqs: list[Sequence], sampling_params: SamplingParams,
                 arrival_time: Optional[float] = None, cache_namespace: str = "") -> None:
        self.request_id = request_id
        self.seqs = seqs
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.prompt_logprobs: Optional[list[Optional[Logprobs]]] = None
        # Finished beams of a beam-search request (HF semantics), as (score, seq).
        self.beam_hypotheses: list[tuple[float, Sequence]] = []
        self.beam_search_done = False
        self.first_token_time: Optional[float] = None
        # Prefix caching: the hash namespace of its blocks, and the prompt tokens found cached
        # when it was first scheduled (None until then).
        self.cache_namespace = cache_namespace
        self.num_cached_tokens: Optional[int] = None
        # Whether the worker was sent the request (prompt and sampling parameters) yet.
        self.sent_to_worker = False
        # Its token stop rules in the scheduler's per-token form (set by the scheduler).
        self.stop_rule: Optional[StopRule] = None
        # Whether its decodes go to the worker as columns (core/step_data.CachedDecodes; set
        # by the scheduler).
        self.decodes_by_columns = False

    @property
    def prompt(self) -> Optional[str]:
        """The prompt text, if one was given."""
        return self.seqs[0].prompt

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt's token ids."""
        return self.seqs[0].prompt_token_ids

    @property
    def is_prefill(self) -> bool:
        """True until the prompt has been run (no sequence has output yet)."""
        for seq in self.seqs:
            if seq.output_token_ids:
                return False
        return True

    def get_seqs(self, status: Optional[SequenceStatus] = None) -> list[Sequence]:
        """The sequences, all or those with ``status``."""
        if status is None:
            return list(self.seqs)
        return [seq for seq in self.seqs if seq.status == status]

    def get_unfinished_seqs(self) -> list[Sequence]:
        """The sequences that are not finished."""
        return [seq for seq in self.seqs if seq.status not in FINISHED_STATUSES]

    def find(self, seq_id: int) -> Sequence:
        """The sequence with ``seq_id``."""
        for seq in self.seqs:
            if seq.seq_id == seq_id:
                return seq
        raise KeyError(f"sequence {seq_id} is not in request {self.request_id}")

    def add(self, seq: Sequence) -> None:
        """Adds a forked sequence."""
        self.seqs.append(seq)

    def remove(self, seq_id: int) -> None:
        """Removes a sequence (its blocks must already be freed)."""
        self.seqs = [seq for seq in self.seqs if seq.seq_id != seq_id]

    def max_num_running_seqs(self) -> int:
        """The most sequences this group will run at once in its lifetime (its batch slots)."""
        if self.is_prefill:
            return self.sampling_params.best_of
        return len(self.get_unfinished_seqs())

    def num_seqs(self, status: Optional[SequenceStatus] = None) -> int:
        """How many sequences have ``status`` (all when None)."""
        return len(self.get_seqs(status))

    def is_finished(self) -> bool:
        """True when every sequence has finished."""
        for seq in self.seqs:
            if seq.status not in FINISHED_STATUSES:
                return False
        return True

    def __repr__(self) -> str:
        return f"SequenceGroup(request_id={self.request_id}, num_seqs={len(self.seqs)})"
