"""What the engine does with a step's new tokens before it hands outputs over: incremental
detokenization, stop strings (the text half of core/stop.py's rules) and beam texts."""

from __future__ import annotations

from typing import Any, Optional

from cacheflow_runtime.core.scheduler import Scheduler
from cacheflow_runtime.core.stop import find_stop_string
from cacheflow_runtime.engine.detokenizer import Detokenizer
from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.sequence import FINISHED_STATUSES, Sequence, SequenceGroup, SequenceStatus


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

    def process(self, groups: list[SequenceGroup], final_only: bool = False) -> None:
        """Updates the texts of the sequences of ``groups`` that got a token since the last
        call.

        ``final_only``: the caller reads the texts of finished requests only (``LLMEngine.step
        (final_only=True)``), so a running sequence without stop strings is left undecoded and
        decoded whole when it finishes (the same text, one decoder call instead of one per
        token).
        """
        detokenizer = self.detokenizer
        if detokenizer is None:
            return
        decode_new_text = detokenizer.decode_new_text
        for group in groups:
            params = group.sampling_params
            if not params.detokenize:
                continue
            if params.use_beam_search:
                if group.beam_search_done:
                    self._beam_texts(group)
                continue
            stop_strings = params.stop_strings
            skip = params.skip_special_tokens
            for seq in group.seqs:
                if seq.num_detokenized == len(seq.output_logprobs):  # seq.num_known_outputs
                    continue
                if final_only and not stop_strings:
                    if seq.status in FINISHED_STATUSES:
                        detokenizer.decode_output(seq, skip)
                    continue
                new_text = decode_new_text(seq, skip)
                if (new_text and stop_strings) or seq.status in FINISHED_STATUSES:
                    self._end_text(params, seq, new_text)

    def process_aborted(self, groups: list[SequenceGroup]) -> None:
        """Brings the texts of aborted ``groups`` up to their tokens as a stream of them shows
        them (after ``final_only`` steps left them undecoded); no stop string is looked for."""
        detokenizer = self.detokenizer
        if detokenizer is None:
            return
        for group in groups:
            if group.sampling_params.use_beam_search or not group.sampling_params.detokenize:
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
            hyp.output_text = self.tokenizer.decode(hyp.output_token_ids,
                                                    skip_special_tokens=skip)
