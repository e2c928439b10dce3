"""The columnar decodes of a step (core/step_data.CachedDecodes): what the scheduler sends for
the running requests' decodes, and that the outputs are those of the per-sequence form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_testutil import EOS, make_engine, run_all

from cacheflow_runtime import SamplingParams, SchedulerConfig
from cacheflow_runtime.core import scheduler as scheduler_module
from cacheflow_runtime.core.block_manager import BlockSpaceManager
from cacheflow_runtime.core.scheduler import Scheduler
from cacheflow_runtime.core.step_data import ModelRunnerOutput, decodes_by_columns
from cacheflow_runtime.sampling_metadata import GroupSampleResult, SampleResult
from cacheflow_runtime.sequence import Sequence, SequenceGroup, SequenceStatus

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("params", "expected"), [
    (dict(temperature=0.0), True),
    (dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=3), True),
    (dict(temperature=0.0, stop_token_ids=[4], stop=["x"]), True),
    (dict(temperature=0.0, logprobs=0), False),  # the sampled token's rank is reported
    (dict(temperature=0.0, logprobs=2), False),
    (dict(temperature=0.0, prompt_logprobs=0), False),
    (dict(temperature=0.0, min_tokens=2), False),
    (dict(temperature=0.0, repetition_penalty=1.2), False),
    (dict(temperature=0.0, frequency_penalty=0.5), False),
    (dict(temperature=0.0, presence_penalty=0.5), False),
    (dict(temperature=0.7, n=2), False),
    (dict(temperature=0.0, n=2, best_of=2, use_beam_search=True), False),
])
def test_only_requests_the_worker_need_not_track_decode_by_columns(
        params: dict[str, Any], expected: bool) -> None:
    assert decodes_by_columns(SamplingParams(**params)) is expected


def test_running_decodes_travel_as_columns() -> None:
    """A request's prompt goes as a ScheduledRequest; its decodes as one row each of the
    columns, with the blocks its table gained, and the worker's tokens come back by row."""
    bm = BlockSpaceManager(8, num_gpu_blocks=16, num_cpu_blocks=0)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=64,
                                          async_scheduling=False), bm, eos_token_ids={EOS})
    seq = Sequence(scheduler.new_seq_id(), None, list(range(1, 9)), block_size=8)
    scheduler.add_seq_group(SequenceGroup("a", [seq], SamplingParams(max_tokens=5)))

    out = scheduler.schedule()
    (req,) = out.scheduled
    assert req.req_id == "a" and out.decodes.req_ids == []
    result = GroupSampleResult([SampleResult(seq.seq_id, 11, {11: -0.25}, 0.0)])
    scheduler.update_from_output(out, ModelRunnerOutput(samples={"a": result}))

    out = scheduler.schedule()
    assert out.scheduled == [] and out.num_scheduled_tokens == 1
    d = out.decodes
    assert (d.req_ids, d.seq_ids, d.token_ids, d.num_computed_tokens) == \
        (["a"], [seq.seq_id], [11], [8])
    assert d.new_blocks == [(0, [1])]  # token 9 starts block 1
    (touched,) = scheduler.update_from_output(
        out, ModelRunnerOutput(decode_token_ids=[12], decode_logprobs=[-0.5]))
    assert touched.request_id == "a"
    assert seq.output_token_ids == [11, 12] and seq.output_logprobs[-1] == {12: -0.5}
    assert seq.cumulative_logprob == -0.75 and seq.num_computed_tokens == 9

    out = scheduler.schedule()
    d = out.decodes
    assert (d.token_ids, d.num_computed_tokens, d.new_blocks) == ([12], [9], [])
    with pytest.raises(RuntimeError, match="1 columnar decodes but the worker returned 0"):
        scheduler.update_from_output(out, ModelRunnerOutput())


def test_a_length_capped_row_finishes() -> None:
    """A row's token that reaches max_tokens ends its sequence, as in the per-sequence form."""
    bm = BlockSpaceManager(8, num_gpu_blocks=16, num_cpu_blocks=0)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=64,
                                          async_scheduling=False), bm, eos_token_ids={EOS})
    seq = Sequence(scheduler.new_seq_id(), None, [1, 2, 3], block_size=8)
    scheduler.add_seq_group(SequenceGroup("a", [seq], SamplingParams(max_tokens=2)))
    out = scheduler.schedule()
    result = GroupSampleResult([SampleResult(seq.seq_id, 5, {5: -1.0}, 0.0)])
    scheduler.update_from_output(out, ModelRunnerOutput(samples={"a": result}))
    out = scheduler.schedule()
    scheduler.update_from_output(out, ModelRunnerOutput(decode_token_ids=[6],
                                                        decode_logprobs=[-1.0]))
    assert seq.status is SequenceStatus.FINISHED_LENGTH_CAPPED
    assert [g.request_id for g in scheduler.free_finished()] == ["a"]


def _prompts() -> list[list[int]]:
    return [[(7 * i + j) % EOS for j in range(3 + i % 5)] for i in range(8)]


def _mixed_params() -> list[SamplingParams]:
    """Greedy, seeded random with truncation, stop tokens, and requests that stay
    per-sequence (penalties, parallel sampling) beside them."""
    return [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.9, seed=11, max_tokens=12),
        SamplingParams(temperature=1.2, min_p=0.1, seed=12, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[3, 9]),
        SamplingParams(temperature=0.0, presence_penalty=0.7, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=0.8, n=2, best_of=2, seed=13, max_tokens=9),
        SamplingParams(temperature=0.0, max_tokens=17, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.5, seed=14, max_tokens=15, ignore_eos=True),
    ]


def _run(tiny: Path, async_scheduling: bool) -> tuple[list[Any], int]:
    """The mixed batch's outputs, and the most columnar decode rows one step had."""
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    schedule = engine.scheduler.schedule
    rows: list[int] = []

    def recording() -> Any:
        plan = schedule()
        rows.append(len(plan.decodes.req_ids))
        return plan

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    outputs = run_all(engine, _prompts(), _mixed_params())
    return [[(c.token_ids, c.text, c.finish_reason, round(c.cumulative_logprob, 5),
              c.logprobs) for c in out.outputs] for out in outputs], max(rows)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_columnar_decodes_give_the_outputs_of_per_sequence_steps(
        tiny: Path, async_scheduling: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy and seeded outputs (tokens, text, logprobs, finish reasons) are the same whether
    the decodes travel as columns or as one object per sequence."""
    columnar, most_rows = _run(tiny, async_scheduling)
    assert most_rows >= 4
    monkeypatch.setattr(scheduler_module, "decodes_by_columns", lambda params: False)
    per_sequence, no_rows = _run(tiny, async_scheduling)
    assert no_rows == 0
    assert columnar == per_sequence


def test_a_request_id_used_again_gets_its_own_sampling_rows(tiny: Path) -> None:
    """The worker keeps the sampler's rows while the batch's requests stay the same; a new
    request under a finished one's id (greedy before, seeded random now) gets new rows."""
    prompt = [[5, 6, 7]]
    seeded = SamplingParams(temperature=1.5, seed=21, max_tokens=12, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = run_all(make_engine(tiny), prompt, seeded)[0].outputs[0].token_ids
    engine = make_engine(tiny)
    for params in (greedy, seeded):
        engine.add_request("x", None, params, prompt[0])
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens = out.outputs[0].token_ids
    first = run_all(make_engine(tiny), prompt, greedy)[0].outputs[0].token_ids
    assert tokens == alone and tokens != first
