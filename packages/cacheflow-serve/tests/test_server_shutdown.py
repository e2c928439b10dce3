"""SIGTERM: `cacheflow serve` exits with status 0, every stream ends properly, new connections
are refused during the grace period, with nothing in flight it exits at once, and no process
(the engine core) is left behind; a SIGTERM to the whole process group drains the same way.

"Properly": no client stream hangs; every stream ends with a chunk carrying a finish_reason and
then ``data: [DONE]``. Requests that finish within the grace period end normally ("length"); the
rest are aborted ("abort").
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cacheflow_models.testing import save_tiny_checkpoint, tiny_llama_config

from serve_testutil import ONE_THREAD_ENV, alive, descendants

GRACE = 1.0
LONG_TOKENS = 3000


@pytest.fixture(scope="module")
def long_context_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA with 4096 positions, so that a stream can outlast the grace period."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("long") / "llama",
                                tiny_llama_config(max_position_embeddings=4096))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stream(client: httpx.AsyncClient, max_tokens: int, first: asyncio.Event
                  ) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": "shutdown test", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    chunks: list[dict[str, Any]] = []
    done = False
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            assert not done, "data after [DONE]"
            chunks.append(json.loads(line[6:]))
            first.set()
    return {"done": done, "chunks": chunks}


async def _new_connection_during_grace(base_url: str) -> list[str]:
    """What new clients see once the signal is in: at most a moment of 503s (the engine stops
    accepting at once), then refused connections (the listener closes on the next tick). A
    connection accepted just before the listener closed is dropped without a response, which
    the client sees as a disconnect instead of a refusal: the same outcome."""
    seen: list[str] = []
    deadline = time.monotonic() + 0.8 * GRACE
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=2) as fresh:
                seen.append(f"status {(await fresh.get('/health')).status_code}")
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            seen.append("refused")
            break
        await asyncio.sleep(0.02)
    return seen


async def _run_and_terminate(proc: subprocess.Popen[bytes], base_url: str
                             ) -> tuple[list[dict[str, Any]], float, list[str]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        firsts = [asyncio.Event() for _ in range(8)]
        tasks = [asyncio.ensure_future(_stream(client, LONG_TOKENS if i < 6 else 8, ev))
                 for i, ev in enumerate(firsts)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in firsts)), 30)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        fresh = await _new_connection_during_grace(base_url)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return list(results), sent, fresh


def _start_server(path: Path, port: int, new_session: bool = False
                  ) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cacheflow_serve", "serve", str(path),
           "--port", str(port), "--served-model-name", "tiny", "--device", "cpu",
           "--dtype", "float32", "--num-gpu-blocks-override", "2048",
           "--shutdown-grace-period", str(GRACE), "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD_ENV}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=new_session)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def _assert_no_process_left(family: set[int]) -> None:
    deadline = time.monotonic() + 5
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in family if alive(p)]


def test_sigterm_while_streaming_closes_every_stream(long_context_path: Path) -> None:
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = _start_server(long_context_path, port)
    family = descendants(proc.pid)
    assert family  # the engine core process
    try:
        results, sent, fresh = asyncio.run(_run_and_terminate(proc, base_url))
        proc.wait(timeout=max(0.1, 10 - (time.monotonic() - sent)))
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert elapsed < 10, output
    assert proc.returncode == 0, output  # a completed graceful shutdown is a success
    # As the serve README says: the listener closes at once (a 503 at most in the meantime).
    assert fresh[-1] == "refused", fresh
    assert set(fresh[:-1]) <= {"status 200", "status 503"}, fresh
    reasons = []
    for result in results:
        assert result["done"], "a stream ended without [DONE]"
        final = result["chunks"][-1]["choices"][0]
        assert final["finish_reason"] in ("length", "abort")
        reasons.append(final["finish_reason"])
    assert reasons[6:] == ["length", "length"]  # short requests finished within the grace
    assert reasons[:6] == ["abort"] * 6  # long ones were aborted after it
    assert elapsed >= GRACE * 0.9
    assert "Traceback" not in output, output
    _assert_no_process_left(family)


def test_sigterm_with_nothing_in_flight_exits_within_a_second(long_context_path: Path) -> None:
    """The issue asks for 1 s; the bound is 3 s to leave room for a busy CI machine."""
    port = _free_port()
    proc = _start_server(long_context_path, port)
    family = descendants(proc.pid)
    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert proc.returncode == 0, output
    assert elapsed < 3.0, f"{elapsed:.2f} s\n{output}"
    _assert_no_process_left(family)


async def _stream_then_signal_group(proc: subprocess.Popen[bytes], base_url: str
                                    ) -> tuple[list[dict[str, Any]], float]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        firsts = [asyncio.Event() for _ in range(2)]
        tasks = [asyncio.ensure_future(_stream(client, tokens, ev))
                 for tokens, ev in zip((LONG_TOKENS, 8), firsts)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in firsts)), 30)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # systemd KillMode=control-group, kill -- -PGID
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return list(results), sent


def test_sigterm_to_the_process_group_still_drains(long_context_path: Path) -> None:
    """The engine core gets the signal too; it must leave the shutdown to the front end."""
    port = _free_port()
    proc = _start_server(long_context_path, port, new_session=True)
    family = descendants(proc.pid)
    try:
        results, sent = asyncio.run(_stream_then_signal_group(proc, f"http://127.0.0.1:{port}"))
        proc.wait(timeout=max(0.1, 10 - (time.monotonic() - sent)))
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert proc.returncode == 0, output
    for result in results:
        assert result["done"], output
    reasons = [result["chunks"][-1]["choices"][0]["finish_reason"] for result in results]
    assert reasons == ["abort", "length"], output  # the long one aborted after the grace
    assert elapsed >= GRACE * 0.9
    assert "died" not in output and "Traceback" not in output, output
    _assert_no_process_left(family)
