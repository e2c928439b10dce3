"""``cacheflow bench serve`` against a server on loopback: it completes and writes its JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheflow_serve.bench import arrival_offsets, percentile
from cacheflow_serve.cli import main
from cacheflow_serve.server import ServerThread

from serve_testutil import server_in_thread


@pytest.fixture(scope="module")
def server(chat_tiny_path: Path) -> Iterator[ServerThread]:
    with server_in_thread(chat_tiny_path, {"kv_cache_blocks": 512}, api_key="k") as thread:
        yield thread


@pytest.mark.parametrize("endpoint, rate", [("completions", "inf"), ("chat", "200")])
def test_bench_serve_reports_and_writes_json(server: ServerThread, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             endpoint: str, rate: str) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "serve", "--base-url", server.base_url, "--endpoint", endpoint,
                 "--num-prompts", "24", "--input-len", "8", "--output-len", "8",
                 "--request-rate", rate, "--ignore-eos", "--api-key", "k",
                 "--output-json", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 24 and summary["failed"] == 0
    assert summary["model"] == "tiny" and summary["output_tokens"] == 24 * 8
    for key in ("ttft_s", "tpot_s", "itl_s"):
        assert 0 < summary[key]["p50"] <= summary[key]["p90"] <= summary[key]["p99"]
    assert summary["request_throughput"] > 0
    table = capsys.readouterr().out
    assert "TTFT" in table and "TPOT" in table and "ITL" in table


def test_bench_helpers() -> None:
    assert arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    offsets = arrival_offsets(2000, 100.0, 0)
    assert offsets == sorted(offsets) and 15 < offsets[-1] < 25  # about 2000 / 100 s
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([], 50) is None
