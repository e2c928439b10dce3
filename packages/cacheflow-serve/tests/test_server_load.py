"""200 concurrent streams, a fifth cut off by the client: the rest complete in full, no 5xx,
and afterwards /metrics shows an idle engine with every KV block free."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import aiohttp
import httpx
import pytest

from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM
from cacheflow_serve.server import ServerThread

from serve_testutil import server_in_thread

NUM_REQUESTS = 200
NUM_CUT = NUM_REQUESTS // 5
MAX_TOKENS = 16
PROMPTS = [f"Request number {i}: tell me about block {i * 7}" for i in range(8)]


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[ServerThread]:
    with server_in_thread(tiny_path, {"kv_cache_blocks": 1024}) as thread:
        yield thread


async def _stream(session: aiohttp.ClientSession, url: str, prompt: str,
                  cut_after: Optional[int]) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True}
    text, reasons, done, chunks = "", [], False, 0
    async with session.post(url, json=body) as resp:
        status = resp.status
        if status != 200:
            return {"status": status, "body": await resp.text()}
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            chunks += 1
            text += chunk["choices"][0]["text"]
            reasons.append(chunk["choices"][0]["finish_reason"])
            if cut_after is not None and chunks >= cut_after:
                resp.close()  # the client goes away mid-stream
                break
    return {"status": status, "text": text, "reasons": reasons, "done": done}


async def _load(base_url: str) -> tuple[list[dict[str, Any]], list[Optional[int]]]:
    rng = random.Random(0)
    cut = set(rng.sample(range(NUM_REQUESTS), NUM_CUT))
    cuts = [rng.randint(1, MAX_TOKENS // 2) if i in cut else None for i in range(NUM_REQUESTS)]
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        url = base_url + "/v1/completions"
        results = await asyncio.gather(*(
            _stream(session, url, PROMPTS[i % len(PROMPTS)], cuts[i])
            for i in range(NUM_REQUESTS)))
    return list(results), cuts


def _metrics(base_url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def test_concurrent_streams_with_disconnects(server: ServerThread, llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]

    started = time.monotonic()
    results, cuts = asyncio.run(_load(server.base_url))
    elapsed = time.monotonic() - started

    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200]
    for i, (result, cut) in enumerate(zip(results, cuts)):
        if cut is None:
            assert result["done"], f"request {i} did not end with [DONE]"
            assert result["text"] == expected[i % len(PROMPTS)], f"request {i}"
            assert result["reasons"][-1] == "length"

    deadline = time.monotonic() + 15
    while True:
        m = _metrics(server.base_url)
        idle = (m["cacheflow_num_requests_running"] == 0
                and m["cacheflow_num_requests_waiting"] == 0
                and m["cacheflow_num_requests_swapped"] == 0
                and m["cacheflow_num_requests_in_flight"] == 0
                and m["cacheflow_gpu_kv_blocks_free"] == m["cacheflow_gpu_kv_blocks_total"]
                and m["cacheflow_cpu_kv_blocks_free"] == m["cacheflow_cpu_kv_blocks_total"])
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, m
    assert m["cacheflow_gpu_cache_usage_perc"] == 0.0
    # The cut streams were noticed and aborted, not run to the end.
    assert 0 < m["cacheflow_num_requests_abandoned_total"] <= NUM_CUT
    assert m["cacheflow_generation_tokens_total"] < NUM_REQUESTS * MAX_TOKENS
    print(f"{NUM_REQUESTS} streams ({NUM_CUT} cut) in {elapsed:.1f} s")


def test_non_streaming_clients_that_give_up_are_aborted(server: ServerThread) -> None:
    before = _metrics(server.base_url)["cacheflow_num_requests_abandoned_total"]

    async def give_up() -> None:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 240, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=0.05) as client:
            results = await asyncio.gather(*(client.post("/v1/completions", json=body)
                                             for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, httpx.TimeoutException) for r in results), results

    asyncio.run(give_up())
    deadline = time.monotonic() + 15
    while True:
        m = _metrics(server.base_url)
        if m["cacheflow_num_requests_in_flight"] == 0 and m["cacheflow_num_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["cacheflow_gpu_kv_blocks_free"] == m["cacheflow_gpu_kv_blocks_total"]
    assert 1 <= m["cacheflow_num_requests_abandoned_total"] - before <= 10
