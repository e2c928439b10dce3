"""Bad input to the server: OpenAI-shaped 4xx errors, never a 5xx, and the server keeps serving.

Hand-written cases first, then schemathesis over the server's own OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from cacheflow_runtime import AsyncLLMEngine
from cacheflow_serve import LLM
from cacheflow_serve.server import CorsPolicy, ServerThread, make_server

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 64
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(chat_tiny_path: Path) -> Iterator[ServerThread]:
    llm = LLM(chat_tiny_path, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
              kv_cache_blocks=512, max_num_seqs=16)  # bounds what one fuzzed request costs
    engine = AsyncLLMEngine(llm.engine, max_queued_requests=4)
    thread = ServerThread(make_server(engine, port=0, api_key=KEY, served_model_names=["tiny"],
                                      log_level="warning", max_request_bytes=MAX_BODY)).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
        yield client


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert {"type", "param", "code"} <= set(body["error"])
    return body["error"]


def _ok(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 3})
    assert resp.status_code == 200, resp.text


COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": "tiny", "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": 5}, "model"),
    ("/v1/chat/completions", {"model": "tiny"}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": -0.5}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "prompt": 42}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [[]]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "stop": [1, 2]}, "stop"),
    ("/v1/completions", {**COMPLETION, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
     "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes please"}, "stream"),
])
def test_wrong_or_missing_fields_are_400(http: httpx.Client, path: str, body: dict[str, Any],
                                         param: str) -> None:
    assert _error(http.post(path, json=body), 400)["param"] == param


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"[1, 2, 3]", b"null", b'"a string"', b"\xff\xfe\x00",
    b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": Infinity}',
])
def test_malformed_bodies_are_400(http: httpx.Client, body: bytes) -> None:
    resp = http.post("/v1/completions", content=body,
                     headers={"Content-Type": "application/json"})
    _error(resp, 400)


@pytest.mark.parametrize("extra, code", [
    ({"max_tokens": 10 ** 9}, "context_length_exceeded"),
    ({"max_tokens": 10 ** 30}, "context_length_exceeded"),
    ({"max_tokens": MAX_MODEL_LEN}, "context_length_exceeded"),
    ({"prompt": "x" * (MAX_MODEL_LEN + 1)}, "context_length_exceeded"),
    ({"prompt": [[5] * 200]}, "context_length_exceeded"),
    ({"prompt": [300, 5]}, None),  # a token id outside the vocabulary
    ({"prompt": ""}, None),
    ({"stop": [""]}, None),
    ({"n": 2, "temperature": 0}, None),  # greedy with n > 1
    ({"n": 2, "best_of": 1}, None),
    ({"logit_bias": {"abc": 1.0}}, None),  # not a token id
    ({"logit_bias": {"5": 101}}, None),  # beyond OpenAI's [-100, 100]
    ({"logit_bias": {"300": 1.0}}, None),  # outside the vocabulary
    ({"allowed_token_ids": []}, None),
    ({"bad_words": ["ok", ""]}, None),
    ({"allowed_token_ids": [5, 300]}, None),  # outside the vocabulary
    ({"suffix": "tail"}, None),
    ({"min_tokens": 10, "max_tokens": 4}, None),
    ({"seed": 2 ** 70}, None),
    ({"n": 17, "temperature": 1.0}, None),  # more sequences than max_num_seqs
])
def test_unservable_requests_are_400(http: httpx.Client, extra: dict[str, Any],
                                     code: Any) -> None:
    err = _error(http.post("/v1/completions", json={**COMPLETION, **extra}), 400)
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code
    _ok(http)


@pytest.mark.parametrize("extra, param, code", [
    ({"prompt": [300, 5]}, "prompt", None),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", None),
    ({"prompt": "x" * (MAX_MODEL_LEN + 1)}, "prompt", "context_length_exceeded"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens", "context_length_exceeded"),
    ({"prompt": ""}, "prompt", None),
    ({"prompt": ["a", ""]}, "prompt", None),
    ({"n": 2, "temperature": 0}, "n", None),
    ({"n": 1, "best_of": 2, "temperature": 0}, "best_of", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ({"stream": False, "stream_options": {}}, "stream_options", None),
    ({"logit_bias": {"\u00b2": 5}}, "logit_bias", None),  # a digit, but not an ASCII one
    ({"logit_bias": {"\u0663": 5}}, "logit_bias", None),  # Arabic-Indic three
])
def test_errors_name_the_field_at_fault(http: httpx.Client, extra: dict[str, Any], param: str,
                                        code: Any) -> None:
    err = _error(http.post("/v1/completions", json={**COMPLETION, **extra}), 400)
    assert (err["param"], err["code"]) == (param, code)


@pytest.mark.parametrize("extra, param, message", [
    ({"n": 2, "temperature": 0}, "n",
     "SamplingParams.n must be 1 with greedy sampling (temperature 0), got 2"),
    ({"stream_options": {"include_usage": True}}, "stream_options",
     "stream_options can only be set when stream is true"),
])
@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION),
                                        ("/v1/chat/completions", CHAT)])
def test_chat_and_completions_name_the_same_field(http: httpx.Client, path: str,
                                                  body: dict[str, Any], extra: dict[str, Any],
                                                  param: str, message: str) -> None:
    """Chat has no best_of: a greedy n > 1 names n on both."""
    err = _error(http.post(path, json={**body, **extra}), 400)
    assert (err["param"], err["message"]) == (param, message)


def test_empty_prompt_message(http: httpx.Client) -> None:
    err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": ""}), 400)
    assert err["message"] == "the prompt is empty: it must have at least one token"


def test_top_k_0_means_off(http: httpx.Client) -> None:
    """As in vLLM ("0 (or -1) to consider all tokens"): the same draws as top_k -1."""
    body = {**COMPLETION, "max_tokens": 6, "temperature": 1.0, "seed": 7, "logprobs": 0}
    tokens = []
    for top_k in (0, -1):
        resp = http.post("/v1/completions", json={**body, "top_k": top_k})
        assert resp.status_code == 200, resp.text
        tokens.append(resp.json()["choices"][0]["logprobs"]["tokens"])
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6


def test_truncate_prompt_tokens_keeps_the_tail_of_a_prompt_of_any_length(
        server: ServerThread, http: httpx.Client) -> None:
    """A prompt longer than any that fits the context (refused before tokenizing) is served
    when truncate_prompt_tokens asks for its tail, as in vLLM; the bound holds without it."""
    bound = server.server.config.app.state.ctx.max_prompt_chars
    long = "a" * (bound + 100)
    assert len(long) < MAX_BODY - 1000
    cases = [("/v1/completions", {**COMPLETION, "prompt": long}),
             ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long}]})]
    for path, body in cases:
        err = _error(http.post(path, json=body), 400)
        assert err["code"] == "context_length_exceeded"
        resp = http.post(path, json={**body, "truncate_prompt_tokens": 10})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["prompt_tokens"] == 10


def test_invalid_json_names_no_field(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": }',
                     headers={"Content-Type": "application/json"})
    err = _error(resp, 400)
    assert err["param"] is None
    assert err["message"].startswith("the body is not valid JSON (at character 28)")


def test_chat_prompt_over_max_model_len_is_400(http: httpx.Client) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "y" * 100}]}
    for limit in ({}, {"max_completion_tokens": 4}):
        err = _error(http.post("/v1/chat/completions", json={**body, **limit}), 400)
        assert (err["param"], err["code"]) == ("messages", "context_length_exceeded")
    body = {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert _error(http.post("/v1/chat/completions", json=body), 400)["param"] == "tools"


def test_chat_template_kwargs_reach_the_template(http: httpx.Client) -> None:
    """vLLM's ``chat_template_kwargs``: passed to the template (one of the template call's own
    options is refused by name, which shows they got there)."""
    ok = http.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"unused": 1}})
    assert ok.status_code == 200, ok.text
    err = _error(http.post("/v1/chat/completions",
                           json={**CHAT, "chat_template_kwargs": {"tokenize": True}}), 400)
    assert err["param"] == "chat_template_kwargs"
    assert "chat_template_kwargs cannot set tokenize" in err["message"]


def test_a_request_without_model_is_served_by_the_served_model(http: httpx.Client) -> None:
    """vLLM's: ``model`` may be left out; the served model answers and names itself."""
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        body = {k: v for k, v in body.items() if k != "model"} | {"ignore_eos": True}
        resp = http.post(path, json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == "tiny"
        assert resp.json()["usage"]["completion_tokens"] == 4


def test_unknown_model_is_404(http: httpx.Client) -> None:
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        err = _error(http.post(path, json={**body, "model": "gpt-17"}), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
    _error(http.get("/v1/models/gpt-17"), 404)
    _error(http.get("/v1/no-such-route"), 404)
    _error(http.get("/v1/completions"), 405)


def test_cors_preflights_and_headers(server: ServerThread, chat_tiny_path: Path) -> None:
    """vLLM's CORS defaults (any origin, method, header): a browser's preflight is answered
    before the API key is asked for, and answers carry Access-Control-Allow-Origin; a policy
    naming origins refuses the others' preflights."""
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        resp = client.options("/v1/chat/completions", headers=preflight)
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == "*"
        assert "POST" in resp.headers["access-control-allow-methods"]
        resp = client.post("/v1/completions", json=COMPLETION,
                           headers={**AUTH, "Origin": "https://app.example"})
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "*"
        assert client.get("/v1/models", headers={"Origin": "https://app.example"}
                          ).headers["access-control-allow-origin"] == "*"  # a 401, with CORS
    llm = LLM(chat_tiny_path, device="cpu", dtype="float32", kv_cache_blocks=64)
    policy = CorsPolicy(allowed_origins=("https://ok.example",))
    strict = ServerThread(make_server(AsyncLLMEngine(llm.engine), port=0, log_level="warning",
                                      cors=policy)).start()
    try:
        with httpx.Client(base_url=strict.base_url, timeout=30) as client:
            assert client.options("/v1/completions", headers=preflight).status_code == 400
            ok = client.options("/v1/completions",
                                headers={**preflight, "Origin": "https://ok.example"})
            assert ok.headers["access-control-allow-origin"] == "https://ok.example"
    finally:
        strict.stop()


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"},
])
def test_bad_api_key_is_401(server: ServerThread, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for method, path, body in (("POST", "/v1/completions", COMPLETION),
                                   ("POST", "/v1/chat/completions", CHAT),
                                   ("GET", "/v1/models", None),
                                   ("POST", "/tokenize", {"prompt": "x"}),
                                   # checked first, as vLLM's: no 404 or 400 before the key
                                   ("GET", "/v1/no-such-route", None),
                                   ("POST", "/v1/completions", {"prompt": 42})):
            resp = client.request(method, path, json=body, headers=headers)
            assert _error(resp, 401)["code"] == "invalid_api_key"
            assert resp.headers["www-authenticate"] == "Bearer"
        assert client.get("/health").status_code == 200  # open, for load balancers
        assert client.get("/metrics").status_code == 200
        assert client.get("/version").status_code == 200


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    body = {**COMPLETION, "prompt": "z" * (MAX_BODY + 10)}
    assert _error(http.post("/v1/completions", json=body), 413)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"z" * 1024
        yield b'"}'

    resp = http.post("/v1/completions", content=chunked(),
                     headers={"Content-Type": "application/json"})
    _error(resp, 413)
    _ok(http)


def test_tokenize_and_detokenize_reject_bad_input(http: httpx.Client) -> None:
    _error(http.post("/tokenize", json={}), 400)
    _error(http.post("/tokenize", json={"prompt": "a", "messages": [
        {"role": "user", "content": "b"}]}), 400)
    _error(http.post("/detokenize", json={"tokens": [1, 99999]}), 400)
    _error(http.post("/detokenize", json={"tokens": [-1]}), 400)
    _error(http.post("/detokenize", json={"tokens": "abc"}), 400)


def test_too_many_queued_requests_get_429(server: ServerThread) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=60,
                                     limits=httpx.Limits(max_connections=None)) as client:
            body = {**COMPLETION, "max_tokens": 8}
            responses = await asyncio.gather(*(client.post("/v1/completions", json=body)
                                               for _ in range(100)))
        for resp in responses:
            if resp.status_code == 429:
                assert _error(resp, 429)["code"] == "rate_limit_exceeded"
        return [r.status_code for r in responses]

    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses


def _with_lone_surrogates(value: Any) -> tuple[Any, int]:
    """``value`` with a lone surrogate put into every string (keys of free-form objects left
    alone), and how many strings were changed."""
    if isinstance(value, str):
        return value[: len(value) // 2] + "\ud800" + value[len(value) // 2:], 1
    if isinstance(value, list):
        items = [_with_lone_surrogates(v) for v in value]
        return [v for v, _ in items], sum(n for _, n in items)
    if isinstance(value, dict):
        items = {k: _with_lone_surrogates(v) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, sum(n for _, n in items.values())
    return value, 0


def test_fuzz_finds_no_server_error(server: ServerThread) -> None:
    """schemathesis cases for every operation of the server's OpenAPI schema (with the right
    API key, so that the bodies get past authentication), each also sent with a lone surrogate
    in every string (JSON escapes as another client would send them): never a 5xx."""
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    calls = []
    invalid_unicode: list[tuple[str, int]] = []
    raw = httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60)

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            bodies = [case.body]
            if isinstance(case.body, dict) and "model" in case.body:
                bodies.append({**case.body, "model": "tiny"})  # past the model check too
            for body in bodies:
                case.body = body
                response = case.call(base_url=server.base_url, headers=AUTH, timeout=60)
                calls.append((case.path, response.status_code))
                assert response.status_code < 500, (case.method, case.path, body,
                                                    response.text)
                if response.status_code >= 400:
                    assert "error" in response.json()
            if case.method != "POST":
                return
            broken, changed = _with_lone_surrogates(bodies[-1])
            if not changed:
                return
            response = raw.post(case.path, content=json.dumps(broken).encode("ascii"),
                                headers={"Content-Type": "application/json"})
            invalid_unicode.append((case.path, response.status_code))
            assert response.status_code < 500, (case.path, broken, response.text)
            assert "error" in response.json()

        check()
    raw.close()
    statuses = {status for _, status in calls}
    assert len(calls) >= 8 * 10 and 200 in statuses
    # Both generation routes were fuzzed (whether any of their 20 random bodies is also a valid
    # request depends on the schema's constraints, so a 200 there is not required).
    assert {"/v1/completions", "/v1/chat/completions"} <= {path for path, _ in calls}
    # Every body with a lone surrogate was refused; most of them as invalid Unicode (400).
    assert len(invalid_unicode) >= 20 and all(s >= 400 for _, s in invalid_unicode)
    assert sum(s == 400 for _, s in invalid_unicode) >= len(invalid_unicode) // 2


def test_server_still_serves_after_all_that(http: httpx.Client) -> None:
    _ok(http)
    assert http.get("/health").status_code == 200


def test_shutting_down_engine_answers_503(server: ServerThread, http: httpx.Client) -> None:
    """Last in this module: it shuts the engine down under the running server."""
    engine = server.server.config.app.state.ctx.engine
    loop = engine._loop
    asyncio.run_coroutine_threadsafe(engine.shutdown(), loop).result(30)
    assert _error(http.post("/v1/completions", json=COMPLETION), 503)["code"] == \
        "service_unavailable"
    _error(http.get("/health"), 503)
