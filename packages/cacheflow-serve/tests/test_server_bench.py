"""``cacheflow bench serve`` against a server on loopback: it completes and writes its JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
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


def test_bench_serve_dataset_sends_token_ids_as_ids(server: ServerThread, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A JSONL line's token-id prompt goes as ids (its 4 tokens, not the text "[5, 6, ...]"),
    and ``--num-prompts`` takes the first lines."""
    data = tmp_path / "requests.jsonl"
    data.write_text('{"prompt": [5, 6, 7, 8], "max_tokens": 3}\n\n'
                    '{"prompt": "Hello", "max_tokens": 2}\n{"prompt": "unused"}\n')
    out = tmp_path / "bench.json"
    assert main(["bench", "serve", "--base-url", server.base_url, "--dataset", str(data),
                 "--num-prompts", "2", "--ignore-eos", "--api-key", "k",
                 "--output-json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert (summary["completed"], summary["output_tokens"]) == (2, 5)
    assert summary["prompt_tokens"] == 4 + len(server_tokens("Hello", server))


def server_tokens(text: str, server: ServerThread) -> list[int]:
    reply = httpx.post(server.base_url + "/tokenize", json={"model": "tiny", "prompt": text},
                       headers={"Authorization": "Bearer k"}, timeout=30)
    return reply.json()["tokens"]


@pytest.mark.parametrize("line, flags, message", [
    ('{"prompt": "x", "max_tokens": null}', [], None),  # max_tokens drawn from --output-len
    ('{"prompt": "x", "max_tokens": 0}', [], ':1: "max_tokens" must be a positive integer'),
    ('{"max_tokens": 4}', [], ':1: each line must be a JSON object with "prompt"'),
    ('not json', [], ":1: not a JSON object"),
    ('{"prompt": [5, -1]}', [], ':1: "prompt" must be a non-empty string or list of token ids'),
    ('{"prompt": [5, 6]}', ["--endpoint", "chat"], "token-id prompts need --endpoint completions"),
    ('{"prompt": "x"}', ["--num-prompts", "0"], "--num-prompts must be a positive integer"),
    ('{"prompt": "x"}', ["--request-rate", "0"], "--request-rate must be a number > 0"),
    ('{"prompt": "x"}', ["--timeout", "0"], "--timeout must be a positive number of seconds"),
    ('{"prompt": "x"}', ["--max-concurrency", "0"], "--max-concurrency must be a positive"),
])
def test_bench_serve_bad_dataset_and_flags_are_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, flags: list[str],
        message: str | None) -> None:
    data = tmp_path / "requests.jsonl"
    data.write_text(line + "\n")
    # an unreachable server: the checks come before any request is sent
    code = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--dataset", str(data),
                 "--timeout", "2", *flags])
    err = capsys.readouterr().err
    if message is None:
        assert "max_tokens" not in err
        return
    assert code == 2, err
    assert message in err


def test_bench_serve_key_and_url_forms(server: ServerThread, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The key comes from --api-key, else $CACHEFLOW_API_KEY (what ``cacheflow serve`` reads),
    else $OPENAI_API_KEY; --base-url may end in /v1 as OpenAI clients take it. A refused
    /v1/models is a one-line usage error (exit 2), not a traceback."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("CACHEFLOW_API_KEY", raising=False)
    small = ["--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--ignore-eos"]
    assert main(["bench", "serve", "--base-url", server.base_url, *small]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cacheflow: error: {server.base_url}/v1/models answered 401")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("CACHEFLOW_API_KEY", "k")
    out = tmp_path / "b.json"
    assert main(["bench", "serve", "--base-url", server.base_url + "/v1/", *small,
                 "--output-json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 2 and summary["base_url"] == server.base_url
    monkeypatch.setenv("CACHEFLOW_API_KEY", "wrong")
    assert main(["bench", "serve", "--base-url", server.base_url, "--api-key", "k", *small]) == 0


def test_bench_serve_checks_its_output_path_first(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An --output-json that cannot be written is refused before any request is sent (the
    server address here would refuse every connection)."""
    for path, why in ((tmp_path, "is a folder"), (tmp_path / "no" / "x.json", "does not exist")):
        assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9",
                     "--output-json", str(path)]) == 2
        assert why in capsys.readouterr().err
