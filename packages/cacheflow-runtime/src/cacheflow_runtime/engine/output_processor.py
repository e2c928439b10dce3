"""What the engine does with a step's new tokens before it hands outputs over: incremental
detokenization, stop strings (the text half of core/stop.py's rules) and beam texts.

For a caller that reads finished outputs only (``LLMEngine.step(final_only=True)``, offline
generation), the text of a request without stop strings decides nothing, so it is built off the
step's critical path: such requests go to a text backlog, worked on while the device computes
a step (:meth:`OutputProcessor.build_texts`, called while the host would otherwise wait for the
step's sampled ids), and a finished one is reported once its text is complete.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Optional

from cacheflow_runtime.core.scheduler import Scheduler
from cacheflow_runtime.core.stop import find_stop_string
from cacheflow_runtime.engine.detokenizer import Detokenizer
from cacheflow_runtime.sampling_metadata import Logprob, Logprobs
from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.sequence import FINISHED_STATUSES, Sequence, SequenceGroup, SequenceStatus

# Tokens decoded one by one in one piece of backlog work (about 2 us each on a server CPU).
_PIECE_TOKENS = 32


def _unnamed(entry: Optional[Logprobs]) -> bool:
    """Whether a reported logprobs entry still lacks its tokens' texts."""
    if not entry:
        return False
    value = next(iter(entry.values()))
    return isinstance(value, Logprob) and value.decoded_token is None


def _text_complete(seq: Sequence) -> bool:
    """Whether the finished ``seq``'s text holds all its tokens, nothing held back."""
    tokens = seq.tokens
    return (tokens is not None and seq.num_detokenized == seq.num_text_outputs
            and seq.read_offset >= len(tokens))


class OutputProcessor:
    """Turns the token ids of the requests a step touched into text, and ends the sequences
    whose text reached a stop string (through the scheduler, which owns statuses).

    ``tokenizer`` None (token ids in, token ids out) leaves every text empty and stop strings
    unchecked; so does a request's ``SamplingParams.detokenize=False`` for that request.
    """

    def __init__(self, tokenizer: Any, scheduler: Scheduler) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.detokenizer: Optional[Detokenizer] = (None if tokenizer is None
                                                   else Detokenizer(tokenizer))
        # The text backlog of final-only steps, by request id, oldest first: finished requests
        # whose text is not complete (reported once it is), and running ones whose text lags
        # their tokens.
        self._finished_backlog: OrderedDict[str, SequenceGroup] = OrderedDict()
        self._running_backlog: OrderedDict[str, SequenceGroup] = OrderedDict()
        # Finished sequences whose text cannot be decoded at once (goes token by token).
        self._by_token: set[int] = set()
        self._token_texts: dict[int, str] = {}  # decoded_token of reported logprobs, by id

    def process(self, groups: list[SequenceGroup], final_only: bool = False) -> None:
        """Updates the texts of the sequences of ``groups`` that got a token since the last
        call.

        ``final_only``: the caller reads the outputs of finished requests only
        (``LLMEngine.step(final_only=True)``), so a request without stop strings is put in the
        text backlog instead (see :meth:`build_texts`): its text is the same, built while the
        device computes instead of on the step's critical path.
        """
        detokenizer = self.detokenizer
        if detokenizer is None:
            return
        decode_new_text = detokenizer.decode_new_text
        for group in groups:
            params = group.sampling_params
            if not params.detokenize:
                continue
            if params.logprobs is not None or params.prompt_logprobs is not None:
                self._name_logprobs(group)
            if params.use_beam_search:
                if group.beam_search_done:
                    self._beam_texts(group)
                continue
            stop_strings = params.stop_strings
            if final_only and not stop_strings:
                request_id = group.request_id
                if group.is_finished():
                    self._running_backlog.pop(request_id, None)
                    self._finished_backlog[request_id] = group
                elif request_id not in self._running_backlog:
                    self._running_backlog[request_id] = group
                continue
            skip = params.skip_special_tokens
            for seq in group.seqs:
                if seq.num_detokenized == seq.num_text_outputs:  # e.g. a hidden stop token
                    if seq.status in FINISHED_STATUSES:
                        self._end_text(params, seq, "")
                    continue
                new_text = decode_new_text(seq, skip)
                if (new_text and stop_strings) or seq.status in FINISHED_STATUSES:
                    self._end_text(params, seq, new_text)

    def _name_logprobs(self, group: SequenceGroup) -> None:
        """Sets ``decoded_token`` (the token's text alone) on the logprobs the request's
        sequences and prompt got since the last call."""
        for seq in group.seqs:
            self._name_new(seq.output_logprobs)
        if group.prompt_logprobs:
            self._name_new(group.prompt_logprobs)

    def _name_new(self, entries: list[Optional[Logprobs]]) -> None:
        start = len(entries)
        while start and _unnamed(entries[start - 1]):
            start -= 1
        texts, decode = self._token_texts, self.tokenizer.decode
        for entry in entries[start:]:
            for token_id, value in entry.items():  # type: ignore[union-attr]
                if isinstance(value, Logprob):
                    text = texts.get(token_id)
                    if text is None:
                        text = texts[token_id] = decode([token_id])
                    value.decoded_token = text

    # ------------------------------------------------------------------ the text backlog
    @property
    def has_finished_backlog(self) -> bool:
        """Whether a finished request waits for its text."""
        return bool(self._finished_backlog)

    @property
    def has_backlog(self) -> bool:
        """Whether any request's text lags its tokens."""
        return bool(self._finished_backlog or self._running_backlog)

    def text_pending(self, group: SequenceGroup) -> bool:
        """Whether ``group`` is finished but its text is not complete yet."""
        return group.request_id in self._finished_backlog

    def build_texts(self, step_ready: Callable[[], bool]) -> list[SequenceGroup]:
        """Works on the text backlog until ``step_ready()`` (while the device still computes
        the step the caller will wait for), then completes the finished requests' texts that
        are not complete yet; returns their groups, in the order they finished.

        The finished requests' texts come first, oldest first, then, while the device is still
        busy, the running ones' (brought up to their tokens, so that little is left when they
        finish). So a finished request is reported at most one step after the one that
        finished it, and its text costs the step loop only what the device's time did not
        cover. A piece of work is small (one decoding of a whole output, up to
        ``_PIECE_TOKENS`` tokens decoded one by one, or one running request), so the host is
        back well under a millisecond after the device is done.
        """
        finished = self._finished_backlog
        done: list[SequenceGroup] = []
        while finished and not step_ready():
            request_id = next(iter(finished))
            group = finished[request_id]
            if self._advance_finished(group):
                del finished[request_id]
                done.append(group)
        if finished:
            return done + self.finish_texts()
        running = self._running_backlog
        if not running:
            return done
        assert self.detokenizer is not None
        decode_new_text = self.detokenizer.decode_new_text
        while running and not step_ready():
            _, group = running.popitem(last=False)
            if group.is_finished():  # aborted, or moved to the finished backlog
                continue
            skip = group.sampling_params.skip_special_tokens
            for seq in group.seqs:
                if seq.num_detokenized < seq.num_text_outputs:
                    decode_new_text(seq, skip)
        return done

    def finish_texts(self) -> list[SequenceGroup]:
        """Completes the text of every finished request of the backlog (for when the device has
        nothing left to compute); returns their groups in the order they finished."""
        done = list(self._finished_backlog.values())
        for group in done:
            while not self._advance_finished(group):
                pass
        self._finished_backlog.clear()
        return done

    def _advance_finished(self, group: SequenceGroup) -> bool:
        """One piece of work on the text of the finished ``group``; whether it is complete."""
        detokenizer = self.detokenizer
        assert detokenizer is not None
        skip = group.sampling_params.skip_special_tokens
        for seq in group.seqs:
            if _text_complete(seq):
                continue
            if seq.seq_id not in self._by_token:
                if detokenizer.decode_rest_at_once(seq, skip) is None:
                    self._by_token.add(seq.seq_id)
                break
            detokenizer.decode_new_text(seq, skip, _PIECE_TOKENS)
            if seq.num_detokenized == seq.num_text_outputs:
                detokenizer.flush_text(seq)
                self._by_token.discard(seq.seq_id)
            break
        return all(_text_complete(seq) for seq in group.seqs)

    def forget(self, request_ids: list[str]) -> None:
        """Drops the given running requests from the text backlog (aborted). A request that had
        finished before the abort and waits for its text stays: its final output is reported as
        it finished, as it would have been without the abort."""
        for request_id in request_ids:
            self._running_backlog.pop(request_id, None)

    def process_aborted(self, groups: list[SequenceGroup]) -> None:
        """Brings the texts of aborted ``groups`` up to their tokens as a stream of them shows
        them (after ``final_only`` steps left them undecoded; an aborted beam search's beams,
        whose texts are built only at its end); no stop string is looked for."""
        detokenizer = self.detokenizer
        if detokenizer is None:
            return
        for group in groups:
            self._running_backlog.pop(group.request_id, None)
            if not group.sampling_params.detokenize:
                continue
            if group.sampling_params.use_beam_search:  # its beams, as the abort left them
                self._beam_texts(group)
                continue
            for seq in group.seqs:
                if seq.num_detokenized < seq.num_known_outputs:
                    detokenizer.decode_new_text(seq, group.sampling_params.skip_special_tokens)

    def _end_text(self, params: SamplingParams, seq: Sequence, new_text: str) -> None:
        """Stop strings in ``new_text`` (the newest text of ``seq``), and the text held back
        of a finished sequence."""
        assert self.detokenizer is not None
        if (new_text and params.stop_strings and seq.status is not SequenceStatus.FINISHED_STOPPED
                and seq.get_output_len() >= params.min_tokens):
            found = find_stop_string(seq.output_text, len(new_text), params)
            if found is not None:
                stop, cut = found
                seq.output_text = seq.output_text[:cut]
                if seq.is_finished():  # length-capped by the same token: the stop string wins
                    seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
                else:
                    self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_STOPPED, stop)
                return
        if seq.is_finished():
            self.detokenizer.flush_text(seq)

    def _beam_texts(self, group: SequenceGroup) -> None:
        if self.tokenizer is None:
            return
        skip = group.sampling_params.skip_special_tokens
        for _, hyp in group.beam_hypotheses:
            hyp.output_text = self.tokenizer.decode(
                hyp.output_token_ids[:hyp.num_text_outputs], skip_special_tokens=skip)
