"""The server over an engine core process (``cacheflow serve``'s default): the same answers as
the in-process engine, clients that go away free their requests in the core, a killed core turns
into 503s and a failing /health, and a core that cannot start raises its own error."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cacheflow_runtime import AsyncLLMEngine, EngineCoreClient
from cacheflow_serve import LLM
from cacheflow_serve.cli import build_parser
from cacheflow_serve.engine_process import start_engine_process
from cacheflow_serve.server import ServerThread, make_server

# One torch thread here and in the engine core process (it takes this process's count).
ONE_TORCH_THREAD = True  # see conftest.py

ENGINE = dict(device="cpu", dtype="float32", kv_cache_blocks=512)


@pytest.fixture(scope="module")
def core(tiny_path: Path) -> Iterator[tuple[EngineCoreClient, ServerThread]]:
    client, _ = start_engine_process(tiny_path, **ENGINE)
    thread = ServerThread(make_server(client, port=0, served_model_names=["tiny"],
                                      log_level="warning")).start()
    yield client, thread
    thread.stop()
    client.close()


@pytest.fixture(scope="module")
def in_process(tiny_path: Path) -> Iterator[ServerThread]:
    llm = LLM(tiny_path, **ENGINE)  # type: ignore[arg-type]
    thread = ServerThread(make_server(AsyncLLMEngine(llm.engine), port=0,
                                      served_model_names=["tiny"], log_level="warning")).start()
    yield thread
    thread.stop()


BODIES: list[dict[str, Any]] = [
    {"prompt": "Hello, my name is", "max_tokens": 24, "temperature": 0},
    {"prompt": [5, 6, 7, 8], "max_tokens": 16, "n": 2, "temperature": 0.9, "seed": 3,
     "logprobs": 2},
    {"prompt": ["a", "The capital of"], "max_tokens": 20, "temperature": 0, "stop": ["e", "o "],
     "echo": True},
    {"prompt": "best of", "max_tokens": 10, "n": 2, "best_of": 3, "temperature": 0.8,
     "seed": 9},
]


def _choices(base_url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    reply = httpx.post(base_url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "return_token_ids": True, **body})
    assert reply.status_code == 200, reply.text
    return sorted(reply.json()["choices"], key=lambda c: c["index"])


def _without_logprobs(choice: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in choice.items() if k != "logprobs"}


def _streamed(base_url: str, body: dict[str, Any]) -> dict[int, tuple[str, Any]]:
    """Per choice: the streamed text and the last finish reason (how the text is cut into
    chunks depends on how fast this client reads)."""
    texts: dict[int, tuple[str, Any]] = {}
    with httpx.stream("POST", base_url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "stream": True, **body}) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text, _ = texts.get(choice["index"], ("", None))
                texts[choice["index"]] = (text + choice["text"], choice["finish_reason"])
    return texts


@pytest.mark.parametrize("body", BODIES)
def test_answers_match_the_in_process_engine(core: tuple[EngineCoreClient, ServerThread],
                                             in_process: ServerThread,
                                             body: dict[str, Any]) -> None:
    _, server = core
    got, want = _choices(server.base_url, body), _choices(in_process.base_url, body)
    # Logprobs may differ in their last bits: when requests arrive decides how the engine
    # batches them, and a batch of another shape may round differently.
    assert [_without_logprobs(c) for c in got] == [_without_logprobs(c) for c in want]
    for a, b in zip(got, want):
        if b["logprobs"] is not None:
            assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
            assert a["logprobs"]["token_logprobs"] == pytest.approx(
                b["logprobs"]["token_logprobs"], abs=1e-4)
            for top_a, top_b in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"]):
                assert top_a == pytest.approx(top_b, abs=1e-4)
    if "best_of" not in body:
        assert _streamed(server.base_url, body) == _streamed(in_process.base_url, body)


def test_the_flag_keeps_the_engine_in_process() -> None:
    parser = build_parser()
    assert not parser.parse_args(["serve"]).disable_frontend_multiprocessing
    assert parser.parse_args(["serve", "--disable-frontend-multiprocessing"]
                             ).disable_frontend_multiprocessing


def test_a_core_that_cannot_start_raises_its_error_here(tmp_path: Path) -> None:
    """The core's own error (the core checks everything first), with its traceback as the
    cause; ``cacheflow serve`` prints it as one line and exits 2 before listening."""
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        start_engine_process(missing, device="cpu")
    assert str(info.value) == f"model path '{missing}' does not exist"
    assert "in the engine core process" in str(info.value.__cause__)
    assert "cacheflow_serve/llm.py" in str(info.value.__cause__)


def test_clients_that_go_away_free_their_requests_in_the_core(
        core: tuple[EngineCoreClient, ServerThread]) -> None:
    client, server = core
    before = client.stats().num_generation_tokens
    body = {"model": "tiny", "prompt": "leave", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                          timeout=60) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    break  # the client goes away after its first chunk
    deadline = time.monotonic() + 30
    while client.num_in_flight or client.stats().num_running or \
            client.stats().num_free_gpu_blocks != client.stats().num_total_gpu_blocks:
        assert time.monotonic() < deadline, client.stats()
        time.sleep(0.05)
    assert client.num_abandoned >= 3
    assert client.stats().num_generation_tokens - before < 3 * 200  # aborted, not run out


def test_a_killed_core_answers_503_and_fails_health(
        core: tuple[EngineCoreClient, ServerThread]) -> None:
    """Last in this module: it kills the module's engine core."""
    client, server = core
    body = {"model": "tiny", "prompt": "kill", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                      timeout=60) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 1:
                os.kill(client.pid or 0, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "service_unavailable" and "killed by SIGKILL" in error["message"]
    reply = httpx.post(server.base_url + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "again", "max_tokens": 2})
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "service_unavailable"
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 503
    assert httpx.get(server.base_url + "/metrics", timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while client._process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client._process.exitcode == -signal.SIGKILL  # reaped: no zombie left
