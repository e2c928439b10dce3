"""Asynchronous scheduling gives exactly the outputs of the synchronous order.

Each workload runs twice on the runtime's tiny decoder (CPU, float32), with
``async_scheduling`` off and on, driven by the same script: requests added and aborted when
earlier requests' outputs reach a given length (so both orders act on the same state). Every
request's stream of outputs must be the same: token ids, text, finish and stop reasons and
the logprobs' token ids identical, logprob values equal up to float32 rounding (the two orders
batch requests differently, and a matmul's rounding depends on its shape). Prompt logprobs are
compared when complete: how many come with each output depends on how a prompt was chunked,
which depends on the batch beside it. The asynchronous run
must really have scheduled steps ahead (``LLMEngine.num_pipelined_steps``), or not at all
where every step has to wait.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from engine_testutil import ALPHABET, EOS, make_engine

from cacheflow_runtime import LLMEngine, RequestOutput, SamplingParams
from cacheflow_runtime.core.scheduler import Scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


Request = tuple[str, list[int], SamplingParams]


@dataclass
class Script:
    """A workload: requests added at the start, requests added once a request's output holds
    ``n`` tokens (``(watched id, n, request)``), and requests aborted then
    (``(watched id, n, aborted id)``)."""

    start: list[Request]
    add_when: list[tuple[str, int, Request]] = field(default_factory=list)
    abort_when: list[tuple[str, int, str]] = field(default_factory=list)


Stream = list[tuple[Any, ...]]


def _logprob_items(logprobs: Any) -> Any:
    """Logprob dicts as sorted (token id, value) tuples (None kept)."""
    if logprobs is None:
        return None
    return [None if d is None else sorted(d.items()) for d in logprobs]


def _snapshot(out: RequestOutput) -> tuple[Any, ...]:
    """One output: (exact part, float part, prompt logprobs)."""
    exact = (out.finished, out.num_cached_tokens,
             [(c.index, list(c.token_ids), c.text, c.finish_reason, c.stop_reason)
              for c in out.outputs])
    floats = [(c.cumulative_logprob, _logprob_items(c.logprobs)) for c in out.outputs]
    return exact, floats, _logprob_items(out.prompt_logprobs)


def _same_floats(a: Any, b: Any) -> bool:
    """Equal structure and ids, values within float32 rounding of the tiny model: the two
    engines may batch a prompt chunk with different neighbours, so the matmuls round
    differently (a prompt logprob of -4.66 moved by 1.1e-5 with transformers 5.25's tiny
    checkpoint)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-5)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_floats(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _drive(engine: LLMEngine, script: Script) -> tuple[dict[str, Stream], int]:
    """Runs the script to the end; each request's outputs in order, and the number of steps."""
    for rid, prompt, params in script.start:
        engine.add_request(rid, None, params, prompt)
    adds, aborts = list(script.add_when), list(script.abort_when)
    streams: dict[str, Stream] = {}
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        for out in outputs:
            streams.setdefault(out.request_id, []).append(_snapshot(out))
        longest = {out.request_id: max(len(c.token_ids) for c in out.outputs)
                   for out in outputs if out.outputs}
        for item in [a for a in adds if longest.get(a[0], -1) >= a[1]]:
            adds.remove(item)
            rid, prompt, params = item[2]
            engine.add_request(rid, None, params, prompt)
        for item in [a for a in aborts if longest.get(a[0], -1) >= a[1]]:
            aborts.remove(item)
            engine.abort_request(item[2])
    assert not adds and not aborts, "a trigger of the script never fired"
    engine.block_manager.check_consistency()
    assert engine.block_manager.get_num_free_gpu_blocks() == engine.num_device_blocks
    return streams, steps


def _both(tiny: Path, script: Script, **engine_args: Any) -> tuple[LLMEngine, int]:
    """Runs ``script`` without and with asynchronous scheduling and checks that every stream
    is the same; returns the asynchronous engine and its number of steps."""
    sync = make_engine(tiny, async_scheduling=False, **engine_args)
    expected, _ = _drive(sync, script)
    assert sync.num_pipelined_steps == 0
    engine = make_engine(tiny, async_scheduling=True, **engine_args)
    got, steps = _drive(engine, script)
    assert got.keys() == expected.keys()
    for rid in expected:
        assert [s[0] for s in got[rid]] == [s[0] for s in expected[rid]], f"request {rid}"
        assert _same_floats([s[1] for s in got[rid]], [s[1] for s in expected[rid]]), \
            f"logprobs of request {rid}"
        assert _same_floats(got[rid][-1][2], expected[rid][-1][2]), f"request {rid}"
    assert all(stream[-1][0][0] for stream in expected.values()), "a request did not finish"
    return engine, steps


def _greedy_tokens(tiny: Path, prompt: list[int], n: int) -> list[int]:
    engine = make_engine(tiny, async_scheduling=False)
    engine.add_request("probe", None, SamplingParams(temperature=0, max_tokens=n,
                                                     ignore_eos=True), prompt)
    last: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            last = list(out.outputs[0].token_ids)
    return last


def _first_new_token(tokens: list[int], start: int) -> tuple[int, int]:
    """The first (index, token) from ``start`` on whose token did not come before (and no EOS
    up to it): a stop token there ends the sequence at that index."""
    for i in range(start, len(tokens)):
        if EOS in tokens[:i + 1]:
            break
        if tokens[i] not in tokens[:i]:
            return i, tokens[i]
    raise AssertionError(f"no usable stop token in {tokens}")


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(EOS) for _ in range(n)]


def test_common_serving_mix_is_pipelined_and_identical(tiny: Path) -> None:
    """Greedy and seeded random sampling (top-k, top-p, min-p, logprobs), stop tokens and stop
    strings found one step after the next was scheduled, max_tokens, EOS, prompt logprobs,
    requests joining and leaving (aborted mid-flight), long prompts in chunks of a small token
    budget beside decodes, and prefix-cache hits."""
    rng = random.Random(11)
    system = _prompt(rng, 21)
    stop_prompt, text_prompt = _prompt(rng, 5), _prompt(rng, 7)
    _, stop_token = _first_new_token(_greedy_tokens(tiny, stop_prompt, 12), 4)
    text = "".join(ALPHABET[t] for t in _greedy_tokens(tiny, text_prompt, 9))
    greedy = SamplingParams(temperature=0, max_tokens=14, logprobs=2)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=3, max_tokens=12)
    script = Script(
        start=[
            ("greedy", system + _prompt(rng, 4), greedy),
            ("seeded", system + _prompt(rng, 9), seeded),
            ("min_p", _prompt(rng, 3), SamplingParams(temperature=1.2, min_p=0.1, seed=8,
                                                      max_tokens=11, logprobs=1)),
            ("stop_token", stop_prompt, SamplingParams(temperature=0, max_tokens=20,
                                                       stop_token_ids=[stop_token])),
            ("stop_text", text_prompt, SamplingParams(temperature=0, max_tokens=20,
                                                      stop=[text[4:6]])),
            ("one", _prompt(rng, 6), SamplingParams(temperature=0, max_tokens=1)),
            ("long", _prompt(rng, 70), SamplingParams(temperature=0.7, seed=1, max_tokens=5,
                                                      prompt_logprobs=2)),
            ("eos", _prompt(rng, 2), SamplingParams(temperature=1.5, seed=4, max_tokens=60)),
            ("doomed", _prompt(rng, 5), SamplingParams(temperature=0, max_tokens=30,
                                                       ignore_eos=True)),
        ],
        add_when=[
            ("greedy", 3, ("cached", system + _prompt(rng, 2), greedy)),
            ("seeded", 6, ("kept_text", text_prompt, SamplingParams(
                temperature=0, max_tokens=20, stop=[text[4:6]],
                include_stop_str_in_output=True))),
            ("cached", 2, ("late", _prompt(rng, 30), SamplingParams(temperature=0.8, seed=9,
                                                                   max_tokens=7))),
        ],
        abort_when=[("doomed", 4, "doomed"), ("greedy", 9, "seeded")])
    engine, steps = _both(tiny, script, max_num_batched_tokens=16)
    assert engine.num_pipelined_steps >= steps // 2
    assert engine.block_manager.prefix_cache_hits > 0


def test_generated_blocks_enter_the_prefix_cache(tiny: Path) -> None:
    """Blocks filled in steps scheduled ahead are cached with their real tokens: a later prompt
    that repeats a finished request's prompt and output finds them."""
    prompt = [5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    follow = prompt + _greedy_tokens(tiny, prompt, 20)[:12]
    script = Script(start=[("a", prompt, params)],
                    add_when=[("a", 20, ("b", follow, SamplingParams(temperature=0,
                                                                     max_tokens=4)))])
    engine, _ = _both(tiny, script)
    assert engine.num_pipelined_steps > 0
    assert engine.block_manager.prefix_cache_hits == 24  # 3 of b's blocks of 8


def test_fallback_steps_stay_identical(tiny: Path) -> None:
    """Parallel sampling (the forking first sample waits, its decodes do not), beam search,
    penalties and min_tokens beside pipelined requests."""
    rng = random.Random(5)
    script = Script(
        start=[
            ("n2", _prompt(rng, 6), SamplingParams(n=2, best_of=3, temperature=1.0, seed=2,
                                                   max_tokens=9)),
            ("beam", _prompt(rng, 5), SamplingParams(n=2, best_of=3, use_beam_search=True,
                                                     temperature=0, max_tokens=6)),
            ("penalties", _prompt(rng, 8), SamplingParams(
                temperature=0.8, seed=6, max_tokens=8, repetition_penalty=1.3,
                frequency_penalty=0.4, presence_penalty=0.2)),
            ("min_tokens", _prompt(rng, 4), SamplingParams(temperature=1.3, seed=7, min_tokens=6,
                                                           max_tokens=12, logprobs=1)),
            ("plain", _prompt(rng, 3), SamplingParams(temperature=0, max_tokens=24,
                                                      ignore_eos=True)),
        ],
        add_when=[("plain", 12, ("late_n2", _prompt(rng, 4), SamplingParams(
            n=3, temperature=0.9, seed=1, max_tokens=5)))])
    engine, steps = _both(tiny, script, max_num_batched_tokens=32)
    assert 0 < engine.num_pipelined_steps < steps


def test_min_tokens_masking_waits_until_it_is_over(tiny: Path) -> None:
    """A stop token sampled right when ``min_tokens`` is reached: a step scheduled ahead before
    then would have the worker (one token behind) still mask it."""
    prompt = [12, 30, 7, 19]
    index, stop_token = _first_new_token(_greedy_tokens(tiny, prompt, 12), 3)
    script = Script(start=[
        ("min_stop", prompt, SamplingParams(temperature=0, min_tokens=index,
                                            stop_token_ids=[stop_token], max_tokens=index + 6)),
        ("plain", [1, 2], SamplingParams(temperature=0, max_tokens=index + 4,
                                         ignore_eos=True))])
    engine, _ = _both(tiny, script)
    assert engine.num_pipelined_steps > 0


def test_beam_search_alone_is_never_scheduled_ahead(tiny: Path) -> None:
    script = Script(start=[("beam", [3, 1, 4, 1, 5], SamplingParams(
        n=2, best_of=2, use_beam_search=True, temperature=0, max_tokens=8))])
    engine, _ = _both(tiny, script)
    assert engine.num_pipelined_steps == 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_with_a_tiny_cache(tiny: Path, mode: str) -> None:
    """A KV cache too small for every request at once: the steps that must preempt (and, by
    swap, bring requests back) wait for the step before; the others run ahead."""
    rng = random.Random(17)
    kinds = [SamplingParams(temperature=0, max_tokens=26, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=5, max_tokens=22, ignore_eos=True)]
    script = Script(start=[(f"r{i}", _prompt(rng, 5 + i), kinds[i % 2]) for i in range(6)])
    engine, steps = _both(tiny, script, blocks=14, preemption_mode=mode, cpu_blocks=64)
    assert engine.scheduler.num_preemptions > 0
    assert 0 < engine.num_pipelined_steps < steps


def test_a_last_token_is_not_scheduled_again(tiny: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose token in the running step reaches max_tokens is left out of the step
    scheduled ahead, and one that stops on a token sampled meanwhile has that step's token
    dropped."""
    scheduled: list[list[str]] = []
    schedule = Scheduler.schedule

    def recording(self: Scheduler) -> Any:
        plan = schedule(self)
        scheduled.append(list(plan.tokens_per_request()))
        return plan

    monkeypatch.setattr(Scheduler, "schedule", recording)
    stop_prompt = [7, 8, 9]
    index, stop_token = _first_new_token(_greedy_tokens(tiny, stop_prompt, 10), 2)
    script = Script(start=[
        ("short", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3)),
        ("stops", stop_prompt, SamplingParams(temperature=0, max_tokens=10,
                                              stop_token_ids=[stop_token])),
        ("long", [4, 5, 6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])
    engine = make_engine(tiny, async_scheduling=True)
    streams, _ = _drive(engine, script)
    assert len(streams["short"]) == 3 and len(streams["short"][-1][0][2][0][1]) == 3
    assert sum("short" in step for step in scheduled) == 3  # the prompt and two decodes
    stops = streams["stops"][-1][0][2][0]
    assert stops[1][-1] == stop_token and len(stops[1]) == index + 1
    # Scheduled once more than it sampled for: the step ahead of its stop token.
    assert sum("stops" in step for step in scheduled) == index + 2
    assert engine.num_pipelined_steps > 0


def test_outputs_stay_identical_across_an_in_flight_prefix_cache_reset(tiny: Path) -> None:
    """``reset_prefix_cache`` between steps, while a step is in flight."""
    prompt = list(range(1, 30))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(tiny, async_scheduling=async_scheduling)
        engine.add_request("a", None, params, prompt)
        final: dict[str, list[int]] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                final[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
            if steps == 4:
                engine.reset_prefix_cache()
                engine.add_request("b", None, params, prompt)
        results.append(final)
        engine.block_manager.check_consistency()
    assert results[0] == results[1] and results[0]["a"] == results[0]["b"]


def test_sampler_results_are_read_once_per_step(tiny: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The host reads a step's samples (``DeviceSamples.assemble``) only when the engine asks
    for the step's result, after the next step was started."""
    from cacheflow_runtime.sampler_output import DeviceSamples

    events: list[str] = []
    assemble = DeviceSamples.assemble

    def reading(self: DeviceSamples) -> Any:
        events.append("read")
        return assemble(self)

    engine = make_engine(tiny, async_scheduling=True)
    launch: Callable[..., Any] = engine.executor.worker.runner.launch  # type: ignore[attr-defined]

    def launching(*args: Any) -> Any:
        events.append("launch")
        return launch(*args)

    monkeypatch.setattr(DeviceSamples, "assemble", reading)
    monkeypatch.setattr(engine.executor.worker.runner, "launch", launching)  # type: ignore
    engine.add_request("a", None, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       [1, 2, 3])
    while engine.has_unfinished_requests():
        engine.step()
    assert events == ["launch", "launch", "read"] * 1 + ["launch", "read"] * 3 + ["read"]


def test_abort_and_shutdown_with_a_step_in_flight(tiny: Path) -> None:
    """A request aborted while its next step runs gets its final output from the next
    ``step()``, with what it had; the engine has unfinished work while a step is in flight,
    and ``shutdown`` drops one."""
    engine = make_engine(tiny, async_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", None, params, [1, 2, 3])
    engine.add_request("b", None, params, [4, 5, 6])
    seen = [len(out.outputs[0].token_ids) for out in engine.step() + engine.step()
            if out.request_id == "a"]
    assert seen == [1, 2] and engine._in_flight is not None
    engine.abort_request("a")
    outputs = {out.request_id: out for out in engine.step()}
    assert outputs["a"].finished and outputs["a"].outputs[0].finish_reason == "abort"
    assert len(outputs["a"].outputs[0].token_ids) == 2
    assert engine.has_unfinished_requests() and engine._in_flight is not None
    engine.shutdown()
    assert engine._in_flight is None


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_aborted_beam_search_finishes_with_its_beams(tiny: Path,
                                                        async_scheduling: bool) -> None:
    """Aborting a beam search ends it: one final output (finished) with the beams it was
    extending, each "abort", best cumulative logprob first, their tokens those of the beams of
    the same search run on; the cache is whole again."""
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    free = engine.block_manager.get_num_free_gpu_blocks()
    params = SamplingParams(use_beam_search=True, best_of=3, n=2, temperature=0, max_tokens=12,
                            ignore_eos=True)
    engine.add_request("beam", None, params, [5, 6, 7, 8])
    steps = [engine.step() for _ in range(4)]
    assert not any(out.finished for outs in steps for out in outs)
    engine.abort_request("beam")
    finals = []
    while engine.has_unfinished_requests():
        finals += [out for out in engine.step() if out.request_id == "beam"]
    assert len(finals) == 1 and finals[0].finished
    outputs = finals[0].outputs
    assert [o.finish_reason for o in outputs] == ["abort", "abort"]
    assert outputs[0].cumulative_logprob >= outputs[1].cumulative_logprob
    assert all(0 < len(o.token_ids) < 12 for o in outputs)
    assert all(o.text == "".join(ALPHABET[t] for t in o.token_ids if t < EOS) for o in outputs)
    assert engine.block_manager.get_num_free_gpu_blocks() == free
    engine.add_request("beam", None, params, [5, 6, 7, 8])  # the id is free again
    full = []
    while engine.has_unfinished_requests():
        full += engine.step()
    assert full[-1].finished and len(full[-1].outputs[0].token_ids) == 12
