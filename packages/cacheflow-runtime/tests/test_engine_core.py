"""The engine core process (EngineCoreClient): the output deltas rebuild every RequestOutput; a
core process gives the outputs of the thread engine, refuses what it refuses, frees what a
consumer leaves, shuts down cleanly; a core that raises ends every stream with EngineClosedError;
a core whose front end is killed exits. (A killed core and a core that fails to start: the
serve package's test_server_engine_process.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from distributed_testutil import process_alive
from engine_testutil import CharTokenizer, RecordingObserver, make_engine

from cacheflow_runtime import (
    AsyncLLMEngine,
    CompletionOutput,
    EngineClosedError,
    EngineCoreClient,
    RequestOutput,
    SamplingParams,
)
from cacheflow_runtime.engine.engine_core import FrameReader, OutputDecoder, OutputEncoder, frame

TOKENIZER = CharTokenizer()


def run(coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ------------------------------------------------------------------ the factories the core runs


class _FailingEngine:
    """The tiny engine, but its ``fail_at``-th step taken while it holds ``fail_with``
    unfinished requests raises (counting only such steps keeps the failure after the test's
    requests are in, however slowly a loaded machine delivers them)."""

    def __init__(self, engine: Any, fail_at: int, fail_with: int) -> None:
        self._engine = engine
        self._fail_at = fail_at
        self._fail_with = fail_with
        self._steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self) -> list[RequestOutput]:
        if self._engine.get_num_unfinished_requests() >= self._fail_with:
            self._steps += 1
            if self._steps == self._fail_at:
                raise RuntimeError("device lost")
        return self._engine.step()


def build_tiny(folder: str, fail_at: Optional[int] = None,
               fail_with: int = 1) -> tuple[Any, dict[str, Any]]:
    """Runs in the core process: the tiny engine (the core takes the test's torch threads)."""
    engine = make_engine(Path(folder))
    if fail_at is not None:
        return _FailingEngine(engine, fail_at, fail_with), {"failing": True}
    return engine, {"answer": 42}


def _client(tiny: Path, **kwargs: Any) -> EngineCoreClient:
    return EngineCoreClient(functools.partial(build_tiny, str(tiny), **kwargs),
                            tokenizer=TOKENIZER)


# ------------------------------------------------------------------ deltas (no process)


def _out(rid: str, texts: list[str], tokens: list[list[int]], finished: bool = False,
         logprobs: bool = False, prompt_logprobs: Optional[list[Any]] = None,
         reason: Optional[str] = None, prompt: Optional[str] = None) -> RequestOutput:
    outputs = [CompletionOutput(i, text, list(ids), -0.5 * len(ids),
                                [{t: -0.1} for t in ids] if logprobs else None,
                                reason if finished else None, "x" if finished else None)
               for i, (text, ids) in enumerate(zip(texts, tokens))]
    return RequestOutput(rid, prompt, [1, 2, 3], prompt_logprobs, outputs, finished,
                         num_cached_tokens=0, arrival_time=10.5,
                         first_token_time=11.25 if tokens[0] else None)


def _roundtrip(encoder: OutputEncoder, decoder: OutputDecoder,
               outputs: list[RequestOutput]) -> list[RequestOutput]:
    wire = pickle.loads(pickle.dumps(encoder.encode(outputs)))
    return [decoder.decode(delta) for delta in wire]


def test_deltas_rebuild_every_output() -> None:
    enc, dec = OutputEncoder(), OutputDecoder()
    enc.add("a", SamplingParams(max_tokens=50, logprobs=1), has_token_ids=True)
    dec.add("a", None, [1, 2, 3])
    enc.add("t", SamplingParams(max_tokens=50), has_token_ids=False)
    dec.add("t", "hello", None)
    enc.add("beam", SamplingParams(n=2, best_of=3, temperature=0.5), has_token_ids=True)
    dec.add("beam", None, [1, 2, 3])
    steps = [
        [_out("a", ["h"], [[7]], logprobs=True, prompt_logprobs=[None, {2: -1.0}]),
         _out("t", ["x"], [[9]], prompt="hello"),
         _out("beam", ["ab", "cd"], [[1, 2], [3, 4]])],
        [_out("a", ["he"], [[7, 8]], logprobs=True,
              prompt_logprobs=[None, {2: -1.0}, {3: -2.0}]),
         _out("beam", ["cd!", "ab"], [[3, 4, 5], [1, 2]])],  # reordered
        # A stop string cut from the text: the text shrinks, the tokens do not.
        [_out("a", ["h"], [[7, 8, 9]], finished=True, logprobs=True, reason="stop",
              prompt_logprobs=[None, {2: -1.0}, {3: -2.0}]),
         _out("t", ["xy"], [[9, 10]], finished=True, prompt="hello"),
         _out("beam", ["zz"], [[6]], finished=True)],  # fewer sequences than before
    ]
    for outputs in steps:
        assert _roundtrip(enc, dec, outputs) == outputs
    assert len(dec) == 0  # every finished request is forgotten


def test_deltas_carry_every_field_of_the_outputs() -> None:
    """A field added to RequestOutput or CompletionOutput must be added to the deltas too
    (engine/engine_core.py); this test then needs its new name."""
    assert [f.name for f in dataclasses.fields(RequestOutput)] == [
        "request_id", "prompt", "prompt_token_ids", "prompt_logprobs", "outputs", "finished",
        "num_cached_tokens", "arrival_time", "first_token_time"]
    assert [f.name for f in dataclasses.fields(CompletionOutput)] == [
        "index", "text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason",
        "stop_reason"]


def test_a_step_of_a_long_request_sends_only_what_is_new() -> None:
    enc, dec = OutputEncoder(), OutputDecoder()
    enc.add("r", SamplingParams(max_tokens=5000, logprobs=2), has_token_ids=True)
    dec.add("r", None, list(range(3000)))
    ids = list(range(4000))
    enc.encode([_out("r", ["z" * 4000], [ids], logprobs=True)])
    step = [_out("r", ["z" * 4001], [ids + [5]], logprobs=True)]
    assert len(pickle.dumps(enc.encode(step))) < 300


def test_the_front_end_builds_the_text_the_core_would_have(tiny: Path,
                                                            one_torch_thread: None) -> None:
    """A request without stop strings whose sequences only grow goes to the core with
    detokenize=False (the core builds no text), and the decoder's text of every streamed output
    is the one the engine would have made itself: invalid UTF-8, characters split over tokens,
    special tokens kept or skipped, n=2, a text prompt and an abort. The others (stop strings,
    best_of > n, detokenize=False) keep the core's text."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from engine_testutil import VOCAB, make_high_byte_tokenizer

    tokenizer = make_high_byte_tokenizer()
    rng = __import__("random").Random(2)
    long = dict(max_tokens=40, ignore_eos=True)
    cases: list[tuple[str, SamplingParams, bool]] = [
        ("greedy", SamplingParams(temperature=0.0, **long), True),
        ("keep", SamplingParams(temperature=1.0, seed=1, skip_special_tokens=False, **long), True),
        ("n2", SamplingParams(n=2, temperature=1.0, seed=2, max_tokens=25), True),
        ("text", SamplingParams(temperature=1.0, seed=3, **long), True),
        ("aborted", SamplingParams(temperature=1.0, seed=4, **long), True),
        # ended by a stop token id: its text left out, or kept with include_stop_str_in_output
        ("stopid", SamplingParams(temperature=1.0, seed=8, stop_token_ids=[28],
                                  **long), True),
        ("stopid_in", SamplingParams(temperature=1.0, seed=8, stop_token_ids=[28],
                                     include_stop_str_in_output=True, **long), True),
        ("stop", SamplingParams(temperature=1.0, seed=5, stop=["\u00e9"], **long), False),
        ("best", SamplingParams(n=1, best_of=2, temperature=1.0, seed=6, max_tokens=12), False),
        ("ids", SamplingParams(temperature=1.0, seed=7, detokenize=False, **long), False),
    ]
    prompts = {rid: [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 12))]
               for rid, _, _ in cases}
    prompts["stopid_in"] = prompts["stopid"]
    text_prompt = "abc d\u00e9 \u00e8 \u65e5"  # bytes of ids below VOCAB only
    core, front = make_engine(tiny, tokenizer=tokenizer), make_engine(tiny, tokenizer=tokenizer)
    encoder, decoder = OutputEncoder(), OutputDecoder(tokenizer)
    for rid, params, here in cases:
        prompt, ids = (text_prompt, None) if rid == "text" else (None, prompts[rid])
        core.add_request(rid, prompt, params, ids)
        sent = decoder.add(rid, prompt, ids, params)
        assert sent is not None and sent.detokenize is (params.detokenize and not here)
        encoder.add(rid, sent, has_token_ids=ids is not None)
        front.add_request(rid, prompt, sent, ids)
    steps = invalid = 0
    last: dict[str, CompletionOutput] = {}
    while core.has_unfinished_requests():
        steps += 1
        if steps == 6:
            core.abort_request("aborted")
            front.abort_request("aborted")
        want = core.step()
        raw = front.step()
        for out in raw:
            if dict((c[0], c[2]) for c in cases)[out.request_id]:
                assert all(c.text == "" for c in out.outputs)  # no text work in the core
        got = [decoder.decode(d) for d in pickle.loads(pickle.dumps(encoder.encode(raw)))]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
            invalid += any("\ufffd" in c.text for c in g.outputs)
            last[g.request_id] = g.outputs[0]
    assert not front.has_unfinished_requests() and len(decoder) == 0
    assert invalid > 0 and steps > 20
    # the same tokens; the stop token's text only with include_stop_str_in_output
    hidden, shown = last["stopid"], last["stopid_in"]
    assert hidden.token_ids == shown.token_ids and isinstance(hidden.stop_reason, int)
    assert len(hidden.token_ids) < 40 and shown.text.startswith(hidden.text)
    stop_text = tokenizer.decode(hidden.token_ids[-1:])
    assert stop_text and shown.text == hidden.text + stop_text


def test_frames_split_anywhere_are_reassembled() -> None:
    payloads = [b"", b"a", bytes(range(256)) * 50]
    stream = b"".join(frame(p) for p in payloads)
    for cut in (1, 7, 8, 9, 300, len(stream) - 1):
        reader = FrameReader()
        assert reader.feed(stream[:cut]) + reader.feed(stream[cut:]) == payloads


# ------------------------------------------------------------------ a core process


CASES = [
    ("greedy", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)),
    ("stop", SamplingParams(temperature=0, max_tokens=40, stop=["e", "a "], ignore_eos=True)),
    ("logprobs", SamplingParams(temperature=0, max_tokens=12, logprobs=2, prompt_logprobs=1)),
    ("n2", SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=16, ignore_eos=True)),
    ("best_of", SamplingParams(n=2, best_of=3, temperature=0.9, seed=6, max_tokens=10)),
    ("beam", SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0,
                            max_tokens=8)),
]


def _approx(values: Optional[list[Any]]) -> Any:
    if values is None:
        return None
    return [None if v is None else {k: pytest.approx(x, abs=1e-4) for k, x in v.items()}
            for v in values]


def _assert_same(got: RequestOutput, want: RequestOutput) -> None:
    """Equal but for the last bits of floats: when requests arrive decides how they are
    batched, and a batch of another shape may round differently."""
    assert (got.request_id, got.prompt, got.prompt_token_ids, got.finished) == \
        (want.request_id, want.prompt, want.prompt_token_ids, want.finished)
    assert got.prompt_logprobs == _approx(want.prompt_logprobs)
    assert len(got.outputs) == len(want.outputs)
    for a, b in zip(got.outputs, want.outputs):
        assert (a.index, a.text, a.token_ids, a.finish_reason, a.stop_reason) == \
            (b.index, b.text, b.token_ids, b.finish_reason, b.stop_reason), got.request_id
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)
        assert a.logprobs == _approx(b.logprobs)


async def _final(engine: Any, rid: str, params: SamplingParams,
                 prompt: str) -> RequestOutput:
    # Token ids for all but the text-prompt case (the core then sends the ids back once).
    ids = None if rid == "stop" else TOKENIZER.encode(prompt)
    outs = [o async for o in engine.generate(rid, prompt if ids is None else None, params, ids)]
    return outs[-1]


async def _all_finals(engine: Any) -> list[RequestOutput]:
    return list(await asyncio.gather(*(_final(engine, rid, p, f"hello {i} there")
                                       for i, (rid, p) in enumerate(CASES))))


def test_core_process_serves_like_the_thread_engine_and_shuts_down_cleanly(
        tiny: Path, one_torch_thread: None) -> None:
    async def in_thread() -> tuple[list[RequestOutput], str]:
        engine = AsyncLLMEngine(make_engine(tiny))
        try:
            with pytest.raises(ValueError) as info:
                await engine.add_request("x", None, CASES[0][1], [99])
            return await _all_finals(engine), str(info.value)
        finally:
            await engine.shutdown()

    expected, thread_error = run(in_thread())
    client = _client(tiny)
    assert client.info == {"answer": 42} and client.scheduler_config.max_model_len == 512
    observer = client.observer = RecordingObserver()
    pid = client.pid
    assert pid is not None and pid != os.getpid() and process_alive(pid)

    async def scenario() -> None:
        finals = await _all_finals(client)
        for got, want in zip(finals, expected):
            _assert_same(got, want)
        assert finals[1].prompt_token_ids == TOKENIZER.encode("hello 1 there")
        assert len(observer.ttft) == len(CASES)
        # A refused request raises the engine's own error and leaves nothing behind.
        with pytest.raises(ValueError) as info:
            await client.add_request("bad", None, CASES[0][1], [99])
        assert str(info.value) == thread_error
        assert client.num_in_flight == 0
        # A consumer that leaves early aborts its request; its blocks come back.
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        seen = 0
        async for _ in await client.add_request("left", None, long, [1, 2, 3]):
            seen += 1
            if seen == 2:
                break
        deadline = time.monotonic() + 30
        while True:
            stats = client.stats()
            if stats.num_running == 0 and stats.num_free_gpu_blocks == \
                    stats.num_total_gpu_blocks:
                break
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.05)
        assert client.num_abandoned == 1 and client.num_in_flight == 0
        # A terminal's Ctrl-C reaches the core too; the front end decides what to do. So does
        # a SIGTERM to the process group (systemd, kill -- -PGID) while the front end lives.
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        again = await _final(client, "again", CASES[0][1], "hello 0 there")
        assert again.outputs[0].token_ids == expected[0].outputs[0].token_ids
        # Shutdown aborts what still runs: its stream ends with an "abort" output.
        stream = await client.add_request("cut", None, long, [4, 5, 6])
        outputs = stream.__aiter__()
        await outputs.__anext__()
        await client.shutdown(grace_period=0.0)
        rest = [o async for o in outputs]
        assert rest and rest[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineClosedError):
            await client.add_request("late", None, long, [1])

    try:
        run(scenario())
    finally:
        client.close()
    assert client._process.exitcode == 0 and not process_alive(pid)
    assert not client.is_running


def test_an_error_in_the_core_ends_every_stream(tiny: Path) -> None:
    client = _client(tiny, fail_at=3, fail_with=3)
    # Long enough that no request ends before the last one is in.
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def scenario() -> None:
        streams = [await client.add_request(f"r{i}", None, params, [1, 2, 3]) for i in range(3)]
        for stream in streams:
            with pytest.raises(EngineClosedError, match="device lost"):
                async for _ in stream:
                    pass
        assert not client.is_accepting
        with pytest.raises(EngineClosedError, match="device lost"):
            await client.add_request("after", None, params, [1])
        await client.shutdown()

    run(scenario())
    assert client._process.exitcode == 1 and not process_alive(client.pid or 0)


DRIVER = """
import functools, sys, time
from test_engine_core import build_tiny
from cacheflow_runtime import EngineCoreClient

if __name__ == "__main__":
    client = EngineCoreClient(functools.partial(build_tiny, sys.argv[1]))
    print(client.pid, flush=True)
    while True:
        time.sleep(0.1)
"""


@contextlib.contextmanager
def _front_end(tiny: Path, script: str = DRIVER, **popen: Any) -> Iterator[tuple[Any, int]]:
    """A front-end process running ``script`` (an EngineCoreClient that prints its core's pid):
    yields the process and the core's pid, and kills the front end if it is still there."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen([sys.executable, "-c", script, str(tiny)], env=env,
                              stdout=subprocess.PIPE, text=True, **popen)
    try:
        assert driver.stdout is not None
        core = int(driver.stdout.readline())
        assert process_alive(core)
        yield driver, core
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone within ``seconds``."""
    deadline = time.monotonic() + seconds
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


def test_the_core_exits_when_its_front_end_is_killed(tiny: Path) -> None:
    with _front_end(tiny) as (driver, core):
        driver.kill()
        driver.wait()
        assert _gone_within(core, 20)


def test_ctrl_c_reaps_the_core_whatever_the_import_order(tiny: Path, tmp_path: Path) -> None:
    """Ctrl-C of the whole group (the core ignores it): the front end's finalizer stops the core,
    also when a weakref finalizer was made before multiprocessing was imported, so that
    multiprocessing's exit hook (it joins the core without a timeout) runs before weakref's."""
    script = ("import signal, tempfile\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal\n"
              "scratch = tempfile.TemporaryDirectory()\n" + DRIVER)
    log = tmp_path / "driver.stderr"
    with open(log, "w") as stderr, _front_end(tiny, script, stderr=stderr,
                                              start_new_session=True) as (driver, core):
        os.killpg(driver.pid, signal.SIGINT)
        try:
            driver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the front end did not exit within 30 s of Ctrl-C:\n{log.read_text()}")
        assert _gone_within(core, 20)


def test_the_core_exits_when_its_process_group_gets_sigterm(tiny: Path) -> None:
    """SIGTERM to the whole group: the core ignores it while its front end lives, and exits
    once the front end (which dies of it here) is gone: no orphan is left."""
    with _front_end(tiny, start_new_session=True) as (driver, core):
        os.killpg(driver.pid, signal.SIGTERM)
        assert driver.wait(timeout=20) == -signal.SIGTERM
        assert _gone_within(core, 20)
