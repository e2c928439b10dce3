"""The server through the official openai client: the same texts as the offline LLM (with the
engine in a process of its own, as ``cacheflow serve`` runs it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

import cacheflow_serve
from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM
from cacheflow_serve.engine_process import start_engine_process
from cacheflow_serve.server import ServerThread, make_server

# One torch thread here and in the engine core process (it takes this process's count).
ONE_TORCH_THREAD = True  # see conftest.py

MODEL = "tiny"
PROMPTS = ["Hello, my name is", "The capital of France", "a"]


@pytest.fixture(scope="module")
def server(chat_tiny_path: Path) -> Iterator[ServerThread]:
    """The server as ``cacheflow serve`` runs it: the engine in a process of its own."""
    engine, _ = start_engine_process(chat_tiny_path, device="cpu", dtype="float32",
                                     kv_cache_blocks=2048)
    thread = ServerThread(make_server(engine, port=0, served_model_names=[MODEL, "alias"],
                                      log_level="warning")).start()
    yield thread
    thread.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def chat_tokenizer(chat_tiny_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(chat_tiny_path), local_files_only=True)


def offline(llm: LLM, prompt: str, **kwargs: Any) -> list[Any]:
    return llm.generate([prompt], SamplingParams(**kwargs), use_tqdm=False)[0].outputs


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_models_lists_the_served_names(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL, "alias"]
    assert client.models.retrieve("alias").id == "alias"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_matches_offline_greedy(client: openai.OpenAI, llm: LLM, prompt: str) -> None:
    expected = offline(llm, prompt, temperature=0, max_tokens=24)[0]
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert resp.choices[0].text == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    assert resp.usage is not None and resp.usage.completion_tokens == len(expected.token_ids)

    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_with_a_batch_of_prompts(client: openai.OpenAI, llm: LLM) -> None:
    resp = client.completions.create(model="alias", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert resp.model == MODEL
    texts = [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
    assert texts == [offline(llm, p, temperature=0, max_tokens=8)[0].text for p in PROMPTS]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_offline_greedy(client: openai.OpenAI, llm: LLM, chat_tokenizer: Any,
                                     stream: bool) -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Count to three."}]
    expected = offline(llm, chat_prompt(chat_tokenizer, messages), temperature=0,
                       max_tokens=20)[0]
    kwargs: dict[str, Any] = dict(model=MODEL, messages=messages, temperature=0,
                                  max_completion_tokens=20, user="someone")
    if not stream:
        resp = client.chat.completions.create(**kwargs)
        assert resp.choices[0].message.role == "assistant"
        assert resp.choices[0].message.content == expected.text
        assert resp.choices[0].finish_reason == expected.finish_reason
        return
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_n2_seeded_sampling_matches_offline(client: openai.OpenAI, llm: LLM,
                                            stream: bool) -> None:
    prompt = PROMPTS[0]
    expected = [c.text for c in offline(llm, prompt, n=2, temperature=0.8, top_p=0.9, seed=11,
                                        max_tokens=12)]
    kwargs: dict[str, Any] = dict(model=MODEL, prompt=prompt, n=2, temperature=0.8, top_p=0.9,
                                  seed=11, max_tokens=12)
    if stream:
        texts = ["", ""]
        for chunk in client.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
    else:
        resp = client.completions.create(**kwargs)
        texts = [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
    assert texts == expected


def test_penalties_match_offline(client: openai.OpenAI, llm: LLM) -> None:
    kwargs = dict(temperature=0, max_tokens=16, presence_penalty=0.7, frequency_penalty=0.4)
    expected = offline(llm, PROMPTS[1], **kwargs)[0].text
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], **kwargs)  # type: ignore
    assert resp.choices[0].text == expected


def test_completion_logprobs_match_offline(client: openai.OpenAI, llm: LLM) -> None:
    expected = offline(llm, PROMPTS[0], temperature=0, max_tokens=10, logprobs=3)[0]
    for stream in (False, True):
        resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10,
                                         temperature=0, logprobs=3, stream=stream)
        chunks = list(resp) if stream else [resp]
        token_logprobs = [lp for c in chunks if c.choices[0].logprobs
                          for lp in c.choices[0].logprobs.token_logprobs]
        assert len(token_logprobs) == len(expected.token_ids)
        for value, token_id, position in zip(token_logprobs, expected.token_ids,
                                             expected.logprobs):
            assert value == pytest.approx(position[token_id], abs=1e-4)
        top = [d for c in chunks if c.choices[0].logprobs
               for d in c.choices[0].logprobs.top_logprobs]
        assert all(1 <= len(d) <= 3 for d in top)


@pytest.mark.parametrize("k", [0, 1])
def test_completion_top_logprobs_hold_the_sampled_token(client: openai.OpenAI, k: int) -> None:
    """OpenAI: each position's top_logprobs has the k most likely tokens and the one sampled
    (up to k + 1 entries), for sampled and echoed prompt tokens alike."""
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                     temperature=1.5, seed=3, logprobs=k, echo=True)
    lp = resp.choices[0].logprobs
    rows = [(t, v, d) for t, v, d in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)
            if d is not None]
    assert len(rows) >= 12
    for token, value, top in rows:
        assert token in top and top[token] == pytest.approx(value, abs=1e-6)
        assert max(1, k) <= len(top) <= k + 1
    if k == 1:  # at temperature 1.5 some sampled tokens are not the most likely one
        assert any(len(top) == 2 for _, _, top in rows)


def test_chat_logprobs_match_offline(client: openai.OpenAI, llm: LLM,
                                     chat_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Say something"}]
    expected = offline(llm, chat_prompt(chat_tokenizer, messages), temperature=0, max_tokens=8,
                       logprobs=2)[0]
    resp = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore
                                          temperature=0, max_tokens=8, logprobs=True,
                                          top_logprobs=2)
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == len(expected.token_ids)
    for entry, token_id, position in zip(content, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(position[token_id], abs=1e-4)
        assert len(entry.top_logprobs) == 2
        best = max(position.values())
        assert entry.top_logprobs[0].logprob == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logit_bias_matches_offline(client: openai.OpenAI, llm: LLM, temperature: float) -> None:
    bias = {70: 100.0, 3: -100.0}
    expected = offline(llm, PROMPTS[0], temperature=temperature, seed=5, max_tokens=8,
                       ignore_eos=True, logit_bias=bias)[0]
    assert list(expected.token_ids) == [70] * 8
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, seed=5,
                                     temperature=temperature, extra_body={"ignore_eos": True},
                                     logit_bias={str(t): v for t, v in bias.items()})
    assert resp.choices[0].text == expected.text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=4, temperature=0, logit_bias={"70": 100},
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == expected.text[:4]


def _prompt_and_output_logprobs(llm: LLM, prompt: str, max_tokens: int) -> tuple[Any, Any]:
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=2,
                                                prompt_logprobs=2), use_tqdm=False)[0]
    return out, out.outputs[0]


def _echo_call(client: openai.OpenAI, stream: bool, **kwargs: Any) -> dict[str, Any]:
    """An echo completion's text, logprobs fields, finish reason and usage, whole or streamed
    (the chunks' parts joined)."""
    if stream:
        chunks = list(client.completions.create(model=MODEL, stream=True,
                                                stream_options={"include_usage": True},
                                                **kwargs))
        choices = [c.choices[0] for c in chunks if c.choices]
        parts = [c.logprobs for c in choices if c.logprobs]
        usage = chunks[-1].usage
    else:
        resp = client.completions.create(model=MODEL, **kwargs)
        choices, usage = resp.choices, resp.usage
        parts = [choices[0].logprobs]
    return {"text": "".join(c.text for c in choices), "finish": choices[-1].finish_reason,
            "tokens": [t for p in parts for t in p.tokens],
            "values": [v for p in parts for v in p.token_logprobs],
            "offsets": [o for p in parts for o in p.text_offset], "usage": usage}


@pytest.mark.parametrize("max_tokens", [3, 0])  # 0: the prompt alone, scored
@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt_tokens(client: openai.OpenAI, llm: LLM,
                                                     stream: bool, max_tokens: int) -> None:
    prompt = PROMPTS[0] if max_tokens else PROMPTS[1]
    out, comp = _prompt_and_output_logprobs(llm, prompt, max(max_tokens, 1))
    got = _echo_call(client, stream, prompt=prompt, max_tokens=max_tokens, temperature=0,
                     logprobs=2, echo=True)
    generated = list(comp.token_ids)[:max_tokens]
    ids = list(out.prompt_token_ids) + generated
    assert got["text"] == prompt + (comp.text if max_tokens else "")
    assert got["finish"] == (comp.finish_reason if max_tokens else "length")
    assert len(got["tokens"]) == len(got["values"]) == len(ids)
    assert got["values"][0] is None
    positions = list(out.prompt_logprobs[1:]) + list(comp.logprobs)[:max_tokens]
    for value, token_id, position in zip(got["values"][1:], ids[1:], positions):
        assert value == pytest.approx(position[token_id], abs=1e-4)
    lengths = [len(t) for t in got["tokens"]]
    assert got["offsets"] == [sum(lengths[:i]) for i in range(len(lengths))]
    assert got["usage"].completion_tokens == len(generated)
    assert got["usage"].prompt_tokens == len(out.prompt_token_ids)


def test_max_tokens_zero_needs_echo(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens 0 needs echo"):
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=0)


def test_bad_words_match_offline(client: openai.OpenAI, llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    base = list(offline(llm, PROMPTS[0], temperature=0, max_tokens=12,
                        ignore_eos=True)[0].token_ids)
    words = [tokenizer.decode(base[i:i + 2]) for i in range(len(base) - 1)
             if tokenizer.encode(tokenizer.decode(base[i:i + 2]),
                                 add_special_tokens=False) == base[i:i + 2]][:1] + ["zz"]
    expected = offline(llm, PROMPTS[0], temperature=0, max_tokens=12, ignore_eos=True,
                       bad_words=words)[0]
    assert len(words) == 2 and list(expected.token_ids) != base
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True,
                                                                "bad_words": words})
    assert resp.choices[0].text == expected.text


def test_truncate_prompt_tokens_keeps_the_prompts_tail(server: ServerThread, llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    expected = llm.generate({"prompt_token_ids": ids[-5:]}, SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "truncate_prompt_tokens": 5, "return_token_ids": True}
    resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json()
    assert resp["choices"][0]["prompt_token_ids"] == ids[-5:]
    assert resp["choices"][0]["token_ids"] == list(expected.token_ids)
    assert resp["usage"]["prompt_tokens"] == 5
    chat = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 2,
        "truncate_prompt_tokens": 4}).json()
    assert chat["usage"]["prompt_tokens"] == 4
    bad = httpx.post(server.base_url + "/v1/completions", timeout=60,
                     json={**body, "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"


def test_allowed_token_ids_match_offline(client: openai.OpenAI, llm: LLM) -> None:
    allowed = [70, 71, 72]
    expected = offline(llm, PROMPTS[1], temperature=1.0, seed=11, max_tokens=10,
                       ignore_eos=True, allowed_token_ids=allowed)[0]
    assert set(expected.token_ids) <= set(allowed)
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, seed=11,
                                     temperature=1.0, extra_body={"ignore_eos": True,
                                                                  "allowed_token_ids": allowed})
    assert resp.choices[0].text == expected.text


def _stop_for(text: str) -> str:
    """A 2-character ASCII stop string whose first occurrence is past the start of ``text``."""
    for i in range(2, len(text) - 2):
        candidate = text[i:i + 2]
        if candidate.isascii() and candidate.isprintable() and text.find(candidate) == i:
            return candidate
    pytest.skip("no usable stop string in this output")


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_stop_string_is_never_streamed_and_matches_offline(client: openai.OpenAI, llm: LLM,
                                                           prompt: str) -> None:
    full = offline(llm, prompt, temperature=0, max_tokens=40)[0].text
    stop = _stop_for(full)
    expected = offline(llm, prompt, temperature=0, max_tokens=40, stop=[stop])[0]
    assert expected.finish_reason == "stop"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                     stop=[stop, "\x00never"])
    assert resp.choices[0].text == expected.text
    assert resp.choices[0].finish_reason == "stop"
    streamed = ""
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=40,
                                           temperature=0, stop=stop, stream=True):
        streamed += chunk.choices[0].text
        assert stop not in streamed
    assert streamed == expected.text


def test_tokenize_detokenize_and_health(server: ServerThread) -> None:
    base = server.base_url
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/version").json() == {"version": cacheflow_serve.__version__}
    tokens = httpx.post(base + "/tokenize", json={"prompt": "héllo"}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 6  # one token per byte
    text = httpx.post(base + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "héllo"
    chat = httpx.post(base + "/tokenize",
                      json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 200 and chat.json()["count"] == len("<|user|>x\n<|assistant|>")


def test_metrics_are_exported(server: ServerThread, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4, temperature=0)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("cacheflow_num_requests_running", "cacheflow_num_requests_waiting",
                 "cacheflow_num_requests_swapped", "cacheflow_gpu_cache_usage_perc",
                 "cacheflow_prompt_tokens_total", "cacheflow_generation_tokens_total",
                 "cacheflow_time_to_first_token_seconds_bucket",
                 "cacheflow_inter_token_latency_seconds_bucket"):
        assert name in text
    samples = _samples(text)
    assert samples["cacheflow_time_to_first_token_seconds_count"] >= 1
    assert samples["cacheflow_inter_token_latency_seconds_count"] >= 3
    assert samples["cacheflow_generation_tokens_total"] >= 4


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def _sse(base_url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", base_url + path, json={"model": MODEL, "stream": True, **body},
                      timeout=60) as reply:
        assert reply.status_code == 200, reply.read()
        return [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]


def test_completions_continuous_usage_stats(server: ServerThread) -> None:
    """``continuous_usage_stats``: each chunk's usage is its choice's prompt and tokens so far
    (two prompts of different lengths, n=2, each token its own chunk through
    ``return_token_ids``); the last chunk has the call's; ``stream_options: {}`` gives only
    that last one (include_usage defaults on, as in vLLM)."""
    body = {"prompt": ["Hello, my name is", "a"], "n": 2, "temperature": 0.9, "seed": 4,
            "max_tokens": 6, "ignore_eos": True, "return_token_ids": True}
    chunks = _sse(server.base_url, "/v1/completions",
                  {**body, "stream_options": {"include_usage": True,
                                              "continuous_usage_stats": True}})
    prompt_len: dict[int, int] = {}
    done: dict[int, int] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        i = choice["index"]
        if "prompt_token_ids" in choice:
            prompt_len[i] = len(choice["prompt_token_ids"])
        done[i] = done.get(i, 0) + len(choice["token_ids"])
        assert chunk["usage"] == {"prompt_tokens": prompt_len[i], "completion_tokens": done[i],
                                  "total_tokens": prompt_len[i] + done[i]}
    assert done == {0: 6, 1: 6, 2: 6, 3: 6} and prompt_len[0] > prompt_len[2]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 24
    assert last["usage"]["prompt_tokens"] == prompt_len[0] + prompt_len[2]
    plain = _sse(server.base_url, "/v1/completions", {**body, "stream_options": {}})
    assert all(c["usage"] is None for c in plain[:-1])
    assert plain[-1]["usage"] == last["usage"]
    no_usage = _sse(server.base_url, "/v1/completions",
                    {**body, "stream_options": {"include_usage": False,
                                                "continuous_usage_stats": True}})
    assert all("usage" not in c for c in no_usage) and no_usage[-1]["choices"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"guided_regex": "[a-z]+"}, "guided_regex"),
    ({"guided_choice": ["yes", "no"]}, "guided_choice"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "structured_outputs"),
])
def test_completions_refuse_output_constraints(server: ServerThread, extra: dict[str, Any],
                                               param: str) -> None:
    """Structured outputs are not served: a completion asking for them gets a 400 naming the
    field instead of unconstrained text; ``response_format`` text is fine."""
    url = server.base_url + "/v1/completions"
    refused = httpx.post(url, json={"model": MODEL, "prompt": "a", "max_tokens": 2, **extra},
                         timeout=60)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param
    ok = httpx.post(url, json={"model": MODEL, "prompt": "a", "max_tokens": 2,
                               "response_format": {"type": "text"}}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1
