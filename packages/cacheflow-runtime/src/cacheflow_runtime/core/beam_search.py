"""Beam search over a request's sequences, with the semantics of HF transformers' beam search.

Each step the sampler hands over the 2W best (beam, token) candidates by cumulative logprob.
Candidates that end (EOS, a stop token, or the length limit) and rank in the top W become
finished hypotheses scored cumulative / generated_len ** length_penalty (the W best are kept);
the W best candidates that do not end become the running beams. The search stops when no
candidate can continue, or (early_stopping=False) once W hypotheses are finished and the best
running beam, scored at its current length, cannot beat the worst of them; early_stopping=True
stops as soon as W hypotheses are finished.
"""

from __future__ import annotations

from dataclasses import dataclass

from cacheflow_runtime.sampling_metadata import SampleResult
from cacheflow_runtime.sequence import SequenceGroup


@dataclass
class BeamStep:
    """The outcome of one beam-search step: the running beams and the newly finished ones."""

    running: list[SampleResult]
    finished: list[tuple[float, SampleResult]]
    done: bool


def beam_step(group: SequenceGroup, candidates: list[SampleResult], ends: list[bool],
              output_len: dict[int, int]) -> BeamStep:
    """Splits ``candidates`` (best first) into running beams and finished hypotheses.

    ``ends[i]`` says whether candidate i ends its sequence; ``output_len[parent]`` is the number of
    tokens the parent sequence has generated before this step.
    """
    params = group.sampling_params
    width = params.best_of
    penalty = params.length_penalty
    finished_scores = [score for score, _ in group.beam_hypotheses]
    full = len(finished_scores) >= width
    new_finished: list[tuple[float, SampleResult]] = []
    if not (full and params.early_stopping):
        for rank, (cand, end) in enumerate(zip(candidates, ends)):
            if end and rank < width:
                length = output_len[cand.parent_seq_id] + 1
                new_finished.append((cand.cumulative_logprob / length ** penalty, cand))
    running = [cand for cand, end in zip(candidates, ends) if not end][:width]
    merged = sorted(finished_scores + [score for score, _ in new_finished], reverse=True)[:width]
    done = not running
    if not done and len(merged) >= width:
        if params.early_stopping:
            done = True
        else:
            length = output_len[running[0].parent_seq_id] + 1
            best_possible = running[0].cumulative_logprob / length ** penalty
            done = best_possible <= merged[-1]
    return BeamStep(running=running, finished=new_finished, done=done)
