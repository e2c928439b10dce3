"""AsyncLLMEngine over a fake LLMEngine: streams, aborts, back-pressure, shutdown, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from engine_testutil import RecordingObserver

from cacheflow_runtime import (
    AsyncLLMEngine,
    CompletionOutput,
    EngineClosedError,
    EngineOverloadedError,
    RequestOutput,
    SamplingParams,
)
from cacheflow_runtime.engine.detokenizer import stop_string_holdback


@dataclass
class _Req:
    request_id: str
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    aborted: bool = False


class _Scheduler:
    def __init__(self) -> None:
        self.running: list[_Req] = []
        self.waiting: list[_Req] = []
        self.swapped: list[_Req] = []
        self.num_preemptions = 0


class _Blocks:
    num_total_gpu_blocks = 100
    num_total_cpu_blocks = 10
    prefix_cache_queries = 40
    prefix_cache_hits = 16

    def __init__(self, scheduler: _Scheduler) -> None:
        self.scheduler = scheduler

    def get_num_free_gpu_blocks(self) -> int:
        return 100 - len(self.scheduler.running)

    def get_num_free_cpu_blocks(self) -> int:
        return 10


class FakeEngine:
    """Each request yields one token (its count, as text "t<i>") per step up to max_tokens.

    ``step_delay`` slows each step; ``fail_at_step`` makes that step raise.
    """

    def __init__(self, step_delay: float = 0.0, fail_at_step: Optional[int] = None) -> None:
        self.scheduler = _Scheduler()
        self.block_manager = _Blocks(self.scheduler)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.steps = 0
        self.aborted_ids: list[str] = []
        self._finished_aborts: list[_Req] = []
        self.threads: set[str] = set()

    def add_request(self, request_id: str, prompt: Optional[str], params: SamplingParams,
                    prompt_token_ids: Optional[list[int]] = None) -> None:
        self.threads.add(threading.current_thread().name)
        if prompt == "bad":
            raise ValueError("bad prompt")
        assert params.max_tokens is not None
        self.scheduler.running.append(_Req(request_id, params.max_tokens))
        self.num_prompt_tokens += 1

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for req in [r for r in self.scheduler.running if r.request_id in ids]:
            self.scheduler.running.remove(req)
            req.aborted = True
            self._finished_aborts.append(req)
            self.aborted_ids.append(req.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.running or self._finished_aborts)

    def step(self) -> list[RequestOutput]:
        self.threads.add(threading.current_thread().name)
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("device lost")
        time.sleep(self.step_delay)
        outputs = []
        for req in list(self.scheduler.running):
            req.tokens.append(len(req.tokens))
            self.num_generation_tokens += 1
            done = len(req.tokens) >= req.max_tokens
            outputs.append(_output(req, "length" if done else None))
            if done:
                self.scheduler.running.remove(req)
        outputs += [_output(r, "abort") for r in self._finished_aborts]
        self._finished_aborts = []
        return outputs


def _output(req: _Req, reason: Optional[str]) -> RequestOutput:
    text = "".join(f"t{i}" for i in req.tokens)
    comp = CompletionOutput(0, text, list(req.tokens), 0.0, None, reason)
    return RequestOutput(req.request_id, None, [1], None, [comp], reason is not None)


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _collect(engine: AsyncLLMEngine, rid: str, max_tokens: int) -> list[RequestOutput]:
    return [out async for out in engine.generate(rid, "p", _params(max_tokens))]


def test_streams_every_request_to_its_end_and_steps_off_the_loop_thread() -> None:
    fake = FakeEngine()

    async def main() -> list[list[RequestOutput]]:
        engine = AsyncLLMEngine(fake)
        results = await asyncio.gather(*(_collect(engine, f"r{i}", 3 + i) for i in range(5)))
        await engine.shutdown()
        return results

    results = run(main())
    for i, outs in enumerate(results):
        final = outs[-1]
        assert final.finished and final.outputs[0].finish_reason == "length"
        assert final.outputs[0].token_ids == list(range(3 + i))
        assert [len(o.outputs[0].token_ids) for o in outs] == sorted(
            len(o.outputs[0].token_ids) for o in outs)  # in order, maybe coalesced
        assert all(not o.finished for o in outs[:-1])
    assert fake.threads == {"cacheflow-engine"}


def test_a_rejected_request_raises_and_leaves_nothing_behind() -> None:
    async def main() -> None:
        engine = AsyncLLMEngine(FakeEngine())
        with pytest.raises(ValueError, match="bad prompt"):
            await engine.add_request("x", "bad", _params(2))
        assert engine.num_in_flight == 0
        outs = await _collect(engine, "x", 2)  # the id is free again
        assert outs[-1].finished
        await engine.shutdown()

    run(main())


def test_leaving_the_stream_early_aborts_the_request() -> None:
    fake = FakeEngine(step_delay=0.005)

    async def main() -> None:
        engine = AsyncLLMEngine(fake)
        async for out in engine.generate("gone", "p", _params(1000)):
            if len(out.outputs[0].token_ids) >= 2:
                break
        task = asyncio.ensure_future(_collect(engine, "cancelled", 1000))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not fake.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert sorted(fake.aborted_ids) == ["cancelled", "gone"]
        assert engine.num_in_flight == 0
        assert engine.stats().num_running == 0
        await engine.shutdown()

    run(main())


def test_an_aborted_requests_id_is_free_at_once_and_its_last_output_stays_away() -> None:
    """Re-adding an id right after its stream was aborted runs a new request: the engine gets
    it under an id of its own while the aborted one's final output is on its way, and the new
    stream sees neither that output nor the engine's id."""
    fake = FakeEngine(step_delay=0.005)

    async def main() -> list[RequestOutput]:
        engine = AsyncLLMEngine(fake)
        stream = await engine.add_request("same", "p", _params(1000))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                break
        stream.abort()
        outs = await _collect(engine, "same", 5)  # before the abort's output came
        again = await _collect(engine, "same", 3)  # and once it has
        await engine.shutdown()
        return outs + again

    outs = run(main())
    assert [o.request_id for o in outs] == ["same"] * len(outs)
    finals = [o for o in outs if o.finished]
    assert [(o.outputs[0].finish_reason, len(o.outputs[0].token_ids)) for o in finals] == [
        ("length", 5), ("length", 3)]
    assert fake.aborted_ids == ["same"]


def test_max_queued_requests_refuses_with_overloaded() -> None:
    fake = FakeEngine(step_delay=0.02)

    async def main() -> None:
        engine = AsyncLLMEngine(fake, max_queued_requests=2)
        warm = (await engine.add_request("w", "p", _params(10_000))).__aiter__()
        await warm.__anext__()  # "w" has started: it no longer counts as queued
        adds = [engine.add_request(rid, "p", _params(3)) for rid in "abc"]
        results = await asyncio.gather(*adds, return_exceptions=True)
        assert isinstance(results[2], EngineOverloadedError)
        for stream in results[:2]:
            assert not isinstance(stream, BaseException)
            assert [o async for o in stream][-1].finished
        late = await engine.add_request("c", "p", _params(2))  # "a" and "b" are done
        assert [o async for o in late][-1].finished
        await warm.aclose()  # aborts "w"
        await engine.shutdown()
        assert fake.aborted_ids == ["w"]

    run(main())


def test_shutdown_finishes_short_requests_and_aborts_long_ones() -> None:
    fake = FakeEngine(step_delay=0.01)

    async def main() -> None:
        engine = AsyncLLMEngine(fake)
        short = asyncio.ensure_future(_collect(engine, "short", 3))
        long = asyncio.ensure_future(_collect(engine, "long", 100_000))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await engine.shutdown(grace_period=0.3)
        assert time.monotonic() - started < 5
        assert (await short)[-1].outputs[0].finish_reason == "length"
        final = (await long)[-1]
        assert final.finished and final.outputs[0].finish_reason == "abort"
        assert not engine.is_running and not engine.is_accepting
        with pytest.raises(EngineClosedError):
            await engine.add_request("late", "p", _params(1))
        await engine.shutdown()  # idempotent

    run(main())


def test_an_engine_failure_ends_every_stream_and_refuses_new_requests() -> None:
    fake = FakeEngine(step_delay=0.01, fail_at_step=3)

    async def main() -> None:
        engine = AsyncLLMEngine(fake)
        with pytest.raises(EngineClosedError, match="device lost"):
            await _collect(engine, "a", 100)
        assert engine.error is not None and not engine.is_accepting
        with pytest.raises(EngineClosedError):
            await engine.add_request("b", "p", _params(1))
        await engine.shutdown()

    run(main())


def test_observer_gets_ttft_once_per_request_and_itl_per_later_token() -> None:
    observer = RecordingObserver()

    async def main() -> None:
        engine = AsyncLLMEngine(FakeEngine(step_delay=0.002), observer=observer)
        await asyncio.gather(_collect(engine, "a", 4), _collect(engine, "b", 6))
        await engine.shutdown()
        stats = engine.stats()
        assert stats.num_generation_tokens == 10 and stats.num_prompt_tokens == 2
        assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (40, 16)
        assert stats.gpu_cache_usage == 0.0

    run(main())
    assert len(observer.ttft) == 2
    assert len(observer.itl) == 3 + 5
    assert all(s >= 0 for s in observer.ttft + observer.itl)


@pytest.mark.parametrize("text, stops, expected", [
    ("hello", [], 0),
    ("hello wor", ["world"], 3),
    ("hello w", ["world", "wx"], 1),
    ("abcab", ["abcabd"], 5),
    ("xyz", ["abc"], 0),
    ("ends with stop", ["stop"], 0),  # a whole stop string was already cut by the engine
    ("aaa", ["aaab"], 3),
])
def test_stop_string_holdback(text: str, stops: list[str], expected: int) -> None:
    assert stop_string_holdback(text, stops) == expected
