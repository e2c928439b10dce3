"""Runtime core v2 end to end on the runtime's own tiny decoder (CPU, float32): one token
budget with chunked prefill, automatic prefix caching, and the plain-data step interface."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any, Optional

import pytest
from engine_testutil import EOS, make_engine, run_all

from cacheflow_runtime import LLMEngine, RequestOutput, SamplingParams
from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput
from cacheflow_runtime.model_executor.worker import Worker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    system = [rng.randrange(EOS) for _ in range(37)]
    prompts = [system + [rng.randrange(EOS) for _ in range(n)] for n in (3, 11, 20, 1)]
    prompts.append([rng.randrange(EOS) for _ in range(150)])  # longer than every chunk budget
    prompts.append([rng.randrange(EOS) for _ in range(2)])
    prompts.append(system[:16])  # exactly two full blocks of 8: a full hit would cover it all
    return prompts


# One request of each kind per prompt, cycling: greedy, seeded random, n > 1, beam search.
_KINDS = [
    SamplingParams(temperature=0, max_tokens=9, logprobs=2),
    SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=11, max_tokens=9,
                   repetition_penalty=1.2, frequency_penalty=0.3),
    SamplingParams(n=2, best_of=3, temperature=1.0, seed=5, max_tokens=7, presence_penalty=0.5),
    SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0, max_tokens=6),
]


def _params(num: int) -> list[SamplingParams]:
    return [_KINDS[i % len(_KINDS)] for i in range(num)]


def _summary(outputs: list[RequestOutput]) -> list[list[tuple[list[int], str]]]:
    return [[(list(c.token_ids), c.finish_reason) for c in out.outputs] for out in outputs]


def _assert_logprobs_close(a: list[RequestOutput], b: list[RequestOutput]) -> None:
    for out_a, out_b in zip(a, b):
        for ca, cb in zip(out_a.outputs, out_b.outputs):
            assert ca.cumulative_logprob == pytest.approx(cb.cumulative_logprob, abs=1e-4)
            if ca.logprobs is not None:
                for la, lb in zip(ca.logprobs, cb.logprobs):
                    assert la.keys() == lb.keys()
                    for t in la:
                        assert la[t] == pytest.approx(lb[t], abs=1e-4)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> list[RequestOutput]:
    """Prefix caching and chunked prefill both off: the behaviour of the previous core."""
    engine = make_engine(tiny, enable_prefix_caching=False, enable_chunked_prefill=False)
    prompts = _prompts()
    return run_all(engine, prompts, _params(len(prompts)))


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("budget", [8, 64, None], ids=["chunk8", "chunk64", "unlimited"])
def test_outputs_do_not_depend_on_caching_or_chunk_budget(
        tiny: Path, reference: list[RequestOutput], caching: bool, budget: int | None) -> None:
    """Greedy, seeded sampling with penalties, n > 1 and beam search give the same tokens (and
    logprobs within 1e-4) whatever the budget and with the cache on or off; a second identical
    batch, served largely from the prefix cache, too."""
    engine = make_engine(tiny, enable_prefix_caching=caching,
                         max_num_batched_tokens=budget or 4096)
    prompts = _prompts()
    first = run_all(engine, prompts, _params(len(prompts)))
    second = run_all(engine, prompts, _params(len(prompts)))
    assert _summary(first) == _summary(reference)
    assert _summary(second) == _summary(reference)
    _assert_logprobs_close(first, reference)
    _assert_logprobs_close(second, reference)
    cached = [out.num_cached_tokens for out in second]
    if caching:
        # Every prompt of the second batch finds its full blocks (all but the last token's).
        assert cached == [(len(p) - 1) // 8 * 8 for p in prompts]
        assert engine.block_manager.prefix_cache_hits >= sum(cached)
    else:
        assert cached == [0] * len(prompts)
        assert engine.block_manager.prefix_cache_queries == 0


class _Recorder:
    """Wraps an executor: records each step's plan (pickled both ways, as a remote worker
    would see it) when it starts and its result when it is read."""

    def __init__(self, engine: LLMEngine) -> None:
        self.inner = engine.executor
        self.steps: list[tuple[bytes, _RecordedStep]] = []
        engine.executor = self  # type: ignore[assignment]

    def execute_model_async(self, plan: SchedulerOutput) -> _RecordedStep:
        blob = pickle.dumps(plan)
        step = _RecordedStep(self.inner.execute_model_async(pickle.loads(blob)))
        self.steps.append((blob, step))
        return step

    def scheduled_tokens(self, req_id: str) -> list[int]:
        """Tokens scheduled for ``req_id`` in each step it appeared in."""
        counts = []
        for blob, _ in self.steps:
            plan = pickle.loads(blob)
            tokens = plan.tokens_per_request()
            if req_id in tokens:
                counts.append(tokens[req_id])
        return counts


class _RecordedStep:
    """A step's handle that keeps the (pickled both ways) result once read."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.output: Optional[ModelRunnerOutput] = None

    def result(self) -> ModelRunnerOutput:
        self.output = pickle.loads(pickle.dumps(self.inner.result()))
        return self.output

    def ready(self) -> bool:
        return bool(self.inner.ready())


def test_shared_full_blocks_are_not_computed_again(tiny: Path) -> None:
    """A prompt that shares 3 full blocks with a finished request computes only its rest."""
    engine = make_engine(tiny, block_size=8)
    recorder = _Recorder(engine)
    base = list(range(1, 31))  # 3 full blocks of 8 and 6 more tokens
    engine.add_request("a", None, SamplingParams(temperature=0, max_tokens=3), base)
    while engine.has_unfinished_requests():
        engine.step()
    follow = base[:24] + [7, 7, 7, 7, 7, 9, 9, 9, 9, 9]
    engine.add_request("b", None, SamplingParams(temperature=0, max_tokens=3), follow)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert recorder.scheduled_tokens("b")[0] == len(follow) - 24
    assert outputs[-1].num_cached_tokens == 24
    assert engine.block_manager.prefix_cache_hits == 24
    fresh = run_all(make_engine(tiny, enable_prefix_caching=False), [follow],
                    SamplingParams(temperature=0, max_tokens=3))
    assert outputs[-1].outputs[0].token_ids == fresh[0].outputs[0].token_ids
    engine.reset_prefix_cache()
    assert engine.block_manager.num_cached_blocks() == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_decodes_go_first_and_long_prompts_are_chunked(tiny: Path,
                                                       async_scheduling: bool) -> None:
    """With a budget of 16 tokens, a running request decodes every step while a 100-token
    prompt is computed in chunks, and a request that arrives behind the long prompt starts at
    the next step (one later with asynchronous scheduling: the step after the current one was
    scheduled before the request came)."""
    engine = make_engine(tiny, max_num_batched_tokens=16, async_scheduling=async_scheduling)
    recorder = _Recorder(engine)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("short", None, greedy, [1, 2, 3])
    engine.step()
    engine.add_request("long", None, SamplingParams(temperature=0, max_tokens=2),
                       [i % EOS for i in range(100)])
    engine.step()
    engine.add_request("late", None, SamplingParams(temperature=0, max_tokens=2), [4, 5])
    while engine.has_unfinished_requests():
        engine.step()
    plans = [pickle.loads(blob) for blob, _ in recorder.steps]
    long_steps = [i for i, p in enumerate(plans) if "long" in p.tokens_per_request()]
    assert len(long_steps) >= 100 // 16
    for i in long_steps:
        assert plans[i].num_scheduled_tokens <= 16
        assert plans[i].tokens_per_request().get("short") == 1, f"step {i} skipped the decode"
    late_first = next(i for i, p in enumerate(plans) if "late" in p.tokens_per_request())
    # Added before step 2 ran, scheduled in it (async: in step 3), beside the long chunks.
    assert late_first == 2 + async_scheduling
    assert sum(recorder.scheduled_tokens("long")) == 100 + 1  # prompt chunks, then one decode


def test_worker_runs_from_pickled_scheduler_outputs(tiny: Path) -> None:
    """A second worker, fed only the pickled plans of an engine's run, returns the same
    sampled tokens (the seam a worker in another process builds on)."""
    engine = make_engine(tiny)
    recorder = _Recorder(engine)
    prompts = _prompts()[:4]
    run_all(engine, prompts, _params(len(prompts)))
    worker = Worker(engine.model_config, engine.cache_config, engine.scheduler_config, "cpu")
    worker.initialize_cache(engine.block_manager.num_total_gpu_blocks,
                            engine.block_manager.num_total_cpu_blocks)
    for blob, step in recorder.steps:
        got = worker.execute_model(pickle.loads(blob))
        expected = step.output
        assert expected is not None and got.samples.keys() == expected.samples.keys()
        for req_id, result in expected.samples.items():
            assert [s.token_id for s in got.samples[req_id].samples] == \
                [s.token_id for s in result.samples]


def test_prompt_logprobs_with_chunks_and_cache(tiny: Path) -> None:
    """Prompt logprobs are the same computed whole, in chunks of 8, and when the prompt's
    prefix is in the cache (such requests skip the cache and compute every prompt token)."""
    prompt = [i % EOS for i in range(5, 45)]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    whole = run_all(make_engine(tiny, enable_prefix_caching=False,
                                enable_chunked_prefill=False), [prompt], params)[0]
    chunked_engine = make_engine(tiny, max_num_batched_tokens=8)
    run_all(chunked_engine, [prompt], SamplingParams(temperature=0, max_tokens=2))
    chunked = run_all(chunked_engine, [prompt], params)[0]
    assert chunked.num_cached_tokens == 0
    assert whole.prompt_logprobs is not None and chunked.prompt_logprobs is not None
    assert len(whole.prompt_logprobs) == len(prompt) == len(chunked.prompt_logprobs)
    assert whole.prompt_logprobs[0] is None and chunked.prompt_logprobs[0] is None
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        assert a is not None and b is not None and a.keys() == b.keys()
        for t in a:
            assert a[t] == pytest.approx(b[t], abs=1e-4)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_with_chunks_and_cache_matches_a_large_cache(tiny: Path, mode: str) -> None:
    """A cache too small for the batch preempts (recompute or swap) and still gives the tokens
    of a cache that holds everything."""
    prompts = _prompts()[:5]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True),
              SamplingParams(n=2, best_of=2, temperature=1.0, seed=9, max_tokens=30,
                             ignore_eos=True)] * 2
    params = params[:len(prompts)]
    big = run_all(make_engine(tiny, blocks=512), prompts, params)
    small = make_engine(tiny, blocks=40, block_size=8, max_num_batched_tokens=24,
                        preemption_mode=mode)
    got = run_all(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert _summary(got) == _summary(big)
    assert small.block_manager.get_num_free_gpu_blocks() == 40
    small.block_manager.check_consistency()


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_prompt_swapped_out_between_chunks_resumes_within_the_free_blocks(
        tiny: Path, async_scheduling: bool) -> None:
    """A prompt swapped out between two of its chunks comes back with a next chunk no larger than
    the free blocks hold (it used to take the whole token budget and run out of blocks), and the
    batch gives the tokens of a cache that holds everything."""
    rng = random.Random(0)
    prompts = [[rng.randrange(EOS) for _ in range(rng.randint(20, 50))] for _ in range(8)]
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True)
    big = run_all(make_engine(tiny, blocks=512, async_scheduling=async_scheduling), prompts,
                  params)
    small = make_engine(tiny, blocks=40, block_size=8, max_num_batched_tokens=32,
                        preemption_mode="swap", async_scheduling=async_scheduling)
    got = run_all(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert _summary(got) == _summary(big)
    assert [len(out.outputs[0].token_ids) for out in got] == [30] * 8
    assert small.block_manager.get_num_free_gpu_blocks() == 40
    small.block_manager.check_consistency()


def test_finished_requests_leave_every_block_free(tiny: Path) -> None:
    engine = make_engine(tiny, blocks=64)
    prompts = _prompts()
    run_all(engine, prompts, _params(len(prompts)))
    bm = engine.block_manager
    assert bm.get_num_free_gpu_blocks() == 64 and bm.get_num_free_cpu_blocks() == 256
    assert bm.num_cached_blocks() > 0  # ... and the cache keeps what they computed
    bm.check_consistency()


def _run_one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> Any:
    return run_all(engine, [prompt], params)[0]


def test_text_stop_strings_end_sequences_through_the_scheduler(tiny: Path) -> None:
    """A stop string found in the text ends the sequence and frees its blocks."""
    engine = make_engine(tiny, blocks=64)
    free = run_all(engine, [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12))[0]
    text = free.outputs[0].text
    assert len(text) >= 6
    stop = text[3:5]
    out = _run_one(engine, [1, 2, 3], SamplingParams(temperature=0, max_tokens=12, stop=stop))
    assert out.outputs[0].text == text[:text.index(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert engine.block_manager.get_num_free_gpu_blocks() == 64
