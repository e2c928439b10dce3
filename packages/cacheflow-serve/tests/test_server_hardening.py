"""Server hardening, through HTTP (raw httpx / http.client and the official openai client):
invalid Unicode is a 400 on every endpoint and the keep-alive connection stays usable, token ids
are integers, numbers are finite, 401s carry WWW-Authenticate, blank API keys are refused, big
prompts are refused before tokenizing, ``/health`` answers while a 4 MB text is tokenized, and a
server without a tokenizer takes and gives token ids."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cacheflow_runtime import AsyncLLMEngine, InvalidArgumentError, SamplingParams
from cacheflow_serve import LLM
from cacheflow_serve.server import ServerThread, make_server
from cacheflow_serve.server.app import build_app
from cacheflow_serve.server.tokenization import PROCESS_MIN_CHARS

ONE_TORCH_THREAD = True  # see conftest.py
KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 64
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _start(llm: LLM, **kwargs: Any) -> ServerThread:
    engine = AsyncLLMEngine(llm.engine)
    return ServerThread(make_server(engine, port=0, served_model_names=["tiny"],
                                    log_level="warning", **kwargs)).start()


@pytest.fixture(scope="module")
def server(chat_tiny_path: Path) -> Iterator[ServerThread]:
    llm = LLM(chat_tiny_path, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
              kv_cache_blocks=256)
    thread = _start(llm, api_key=KEY)
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=server.base_url + "/v1", max_retries=0)


def _error(resp: httpx.Response | Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]


def _raw_json(value: Any) -> bytes:
    """JSON as a client in another language may send it: lone surrogates as \\ud800 escapes
    (Python's httpx and openai clients refuse to encode them)."""
    return json.dumps(value, ensure_ascii=True).encode("ascii")


# ------------------------------------------------------------------ invalid Unicode

SURROGATE = "a\ud800b"
INVALID_UNICODE: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/completions", {**COMPLETION, "prompt": SURROGATE}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["ok", SURROGATE]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "stop": [SURROGATE]}, "stop"),
    ("/v1/completions", {**COMPLETION, "user": SURROGATE}, "user"),
    ("/v1/completions", {**COMPLETION, "model": SURROGATE}, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": SURROGATE}]},
     "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "x", "name": SURROGATE}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "stop": SURROGATE}, "stop"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": SURROGATE}},
     "response_format"),
    ("/tokenize", {"prompt": SURROGATE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
    ("/detokenize", {"model": SURROGATE, "tokens": [5]}, "model"),
]


def test_invalid_unicode_is_400_everywhere_on_one_kept_alive_connection(
        server: ServerThread) -> None:
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {**AUTH, "Content-Type": "application/json"}
    try:
        conn.connect()
        sock = conn.sock
        for path, body, param in INVALID_UNICODE:
            conn.request("POST", path, body=_raw_json(body), headers=headers)
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            assert resp.status == 400, (path, body, payload)
            assert payload["error"]["type"] == "invalid_request_error"
            assert payload["error"]["param"] == param, (path, payload)
            assert "not valid Unicode" in payload["error"]["message"], payload
            assert resp.getheader("connection", "keep-alive").lower() != "close"
        conn.request("POST", "/v1/completions", body=_raw_json(COMPLETION), headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["choices"]) == 1
        assert conn.sock is sock  # the same connection throughout
    finally:
        conn.close()


def test_invalid_unicode_in_a_streamed_request_is_400(http: httpx.Client) -> None:
    body = {**COMPLETION, "prompt": SURROGATE, "stream": True}
    resp = http.post("/v1/completions", content=_raw_json(body),
                     headers={"Content-Type": "application/json"})
    assert _error(resp, 400)["param"] == "prompt"


def test_invalid_utf8_in_a_path_is_404(http: httpx.Client) -> None:
    assert _error(http.get("/v1/models/%ED%A0%80"), 404)["code"] == "model_not_found"


# ------------------------------------------------------------------ types and numbers


@pytest.mark.parametrize("prompt", [[True], [[1, True]], [1, 2.0], [False, 1]])
def test_booleans_and_floats_are_not_token_ids(http: httpx.Client, prompt: Any) -> None:
    assert _error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}),
                  400)["param"] == "prompt"
    _error(http.post("/detokenize", json={"tokens": prompt}), 400)


def test_stop_token_ids_must_be_integers(http: httpx.Client) -> None:
    for bad in ([1.7], [True], "7"):
        err = _error(http.post("/v1/completions", json={**COMPLETION, "stop_token_ids": bad}),
                     400)
        assert err["param"] == "stop_token_ids"


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "min_p",
                                   "repetition_penalty"])
def test_nan_is_refused_as_not_finite(http: httpx.Client, field: str) -> None:
    resp = http.post("/v1/completions", headers={"Content-Type": "application/json"},
                     content=f'{{"model": "tiny", "prompt": "x", "{field}": NaN}}'.encode())
    err = _error(resp, 400)
    assert err["param"] == field
    assert "finite" in err["message"] and "less than" not in err["message"], err


def test_openai_client_gets_named_400s(client: openai.OpenAI) -> None:
    # (The client itself refuses to send NaN or lone surrogates; raw HTTP covers those.)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", temperature="hot")  # type: ignore
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[True], max_tokens=2)  # type: ignore
    assert info.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", extra_body={"stop_token_ids": [1.7]})
    assert info.value.body["param"] == "stop_token_ids"  # type: ignore[index]
    out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3)
    assert out.usage is not None and out.usage.prompt_tokens == 3


# ------------------------------------------------------------------ size bound


def test_prompt_beyond_any_fitting_length_is_refused_before_tokenizing(
        http: httpx.Client, server: ServerThread) -> None:
    limit = server.server.config.app.state.ctx.max_prompt_chars
    assert limit == MAX_MODEL_LEN * 5 * 4  # "<unk>" is the longest of the byte vocabulary
    err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": "z" * (limit + 1)}),
                 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert err["message"].startswith(f"prompt has {limit + 1} characters")
    body = {**CHAT, "messages": [{"role": "user", "content": "z" * limit}]}
    err = _error(http.post("/v1/chat/completions", json=body), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    # /tokenize counts any text the body limit lets through.
    resp = http.post("/tokenize", json={"prompt": "z" * (limit + 1)})
    assert resp.status_code == 200 and resp.json()["count"] == limit + 1


# ------------------------------------------------------------------ API keys


def test_401_carries_www_authenticate(server: ServerThread) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            resp = anonymous.post("/v1/completions", json=COMPLETION, headers=headers)
            assert _error(resp, 401)["code"] == "invalid_api_key"
            assert resp.headers["www-authenticate"] == "Bearer"
    bad = openai.OpenAI(api_key="nope", base_url=server.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", ["", "   ", "\t\n"])
def test_blank_api_key_is_refused(llm: LLM, key: str) -> None:
    with pytest.raises(InvalidArgumentError, match="api_key must be a non-blank string"):
        build_app(AsyncLLMEngine(llm.engine), api_key=key)


# ------------------------------------------------------------------ /health under load

WORDS = [f"w{i}" for i in range(256)]


@pytest.fixture(scope="module")
def word_level_path(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a word-level tokenizer (one token per word of ``WORDS``), so that a
    4 MB text tokenizes in about a second instead of a minute of one token per byte."""
    path = tmp_path_factory.mktemp("word_level") / "llama"
    shutil.copytree(tiny_path, path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(path))
    return path


def test_health_answers_while_a_4mb_text_is_tokenized(word_level_path: Path) -> None:
    """The target is 100 ms per health check; the test allows 3x that (300 ms) for a shared,
    loaded CI machine, and 100 ms for the median."""
    llm = LLM(word_level_path, device="cpu", dtype="float32", kv_cache_blocks=64)
    thread = _start(llm, max_request_bytes=8 * 1024 * 1024)
    text = " ".join(WORDS[i % 256] for i in range(1_100_000))[:4_000_000].rsplit(" ", 1)[0]
    expected = len(text.split())
    try:
        async def scenario() -> tuple[list[float], int, dict[str, Any]]:
            async with httpx.AsyncClient(base_url=thread.base_url, timeout=300) as http:
                # Start the tokenizer worker process first, so that what overlaps the health
                # checks below is the tokenization itself.
                warm = await http.post("/tokenize", json={"prompt": "w1 " * 100_000})
                assert warm.json()["count"] == 100_000
                big = asyncio.ensure_future(http.post("/tokenize", json={"prompt": text}))
                await asyncio.sleep(0.05)
                latencies, during = [], 0
                for _ in range(50):
                    start = time.perf_counter()
                    resp = await http.get("/health")
                    latencies.append(time.perf_counter() - start)
                    assert resp.status_code == 200
                    during += not big.done()
                    await asyncio.sleep(0.01)
                result = await big
                return latencies, during, result.json()

        latencies, during, body = asyncio.run(scenario())
        # The worker also serves completions' prompts (ids as packed integers): same ids.
        ctx = thread.server.config.app.state.ctx
        words = "w7 w200 w13 " * (PROCESS_MIN_CHARS // 10)
        ids = asyncio.run_coroutine_threadsafe(ctx.tokenization.encode(words),
                                               ctx.engine._loop).result(120)
        assert ids == llm.get_tokenizer().encode(words) and len(ids) > PROCESS_MIN_CHARS // 4
    finally:
        thread.stop()
    assert body["count"] == expected and len(body["tokens"]) == expected
    assert body["tokens"][:3] == [3, 4, 5]
    assert during >= 10, f"only {during} health checks overlapped the tokenization"
    assert max(latencies) < 0.3, latencies
    assert statistics.median(latencies) < 0.1, latencies


# ------------------------------------------------------------------ --skip-tokenizer-init


def test_server_without_tokenizer_takes_and_gives_token_ids(llm: LLM,
                                                            no_tokenizer_path: Path) -> None:
    bare = LLM(no_tokenizer_path, skip_tokenizer_init=True, device="cpu", dtype="float32",
               kv_cache_blocks=64)
    thread = _start(bare)
    prompt = [72, 101, 108, 108, 111]
    try:
        with httpx.Client(base_url=thread.base_url, timeout=60) as http:
            resp = http.post("/v1/completions", json={
                "model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            assert resp.status_code == 200, resp.text
            choice = resp.json()["choices"][0]
            for path, body, param in (
                    ("/v1/completions", {"model": "tiny", "prompt": "Hello"}, "prompt"),
                    ("/v1/completions", {"model": "tiny", "prompt": prompt, "stop": "x"}, "stop"),
                    ("/v1/chat/completions", CHAT, "messages"),
                    ("/tokenize", {"prompt": "Hello"}, "prompt"),
                    ("/detokenize", {"tokens": [5]}, "tokens")):
                err = _error(http.post(path, json=body), 400)
                assert err["param"] == param and "--skip-tokenizer-init" in err["message"]
            assert http.get("/health").status_code == 200
    finally:
        thread.stop()
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = llm.generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)
    assert choice["text"] == "" and choice["token_ids"] == want[0].outputs[0].token_ids
    assert choice["prompt_token_ids"] == prompt

