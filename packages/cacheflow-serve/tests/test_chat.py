"""Chat through ``LLM.chat``, ``cacheflow generate --chat`` and the server, on a tokenizer that
adds BOS to plain text and a template that writes BOS itself (as LLaMA 3's and Gemma's do): the
prompt's token ids are HF ``apply_chat_template(tokenize=True)``'s, one BOS, not two."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from cacheflow_runtime import InvalidRequestError, SamplingParams
from cacheflow_serve import LLM
from cacheflow_serve.chat_template import encode_chat, template_messages
from cacheflow_serve.cli import main
from cacheflow_serve.server import ServerThread

from serve_testutil import assert_idle, server_in_thread

BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                "{% for c in m.get('tool_calls', []) %}[{{ c['function']['name'] }}:"
                "{{ c['function']['arguments'] | tojson }}]{% endfor %}"
                "{% if not loop.last or not continue_final_message %}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def bos_chat_path(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a tokenizer that puts BOS before any text it encodes and a chat
    template that writes BOS too."""
    path = tmp_path_factory.mktemp("bos_chat") / "llama"
    shutil.copytree(tiny_path, path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = BOS_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(bos_chat_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(bos_chat_path), local_files_only=True)


@pytest.fixture(scope="module")
def chat_llm(bos_chat_path: Path) -> LLM:
    return LLM(bos_chat_path, device="cpu", dtype="float32")


def hf_ids(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    kwargs.setdefault("add_generation_prompt", True)
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                              **kwargs))


def test_the_fixture_tokenizer_adds_bos_to_plain_text(hf_tokenizer: Any) -> None:
    bos = hf_tokenizer.bos_token_id
    assert hf_tokenizer.encode("ab") == [bos, *hf_tokenizer.encode("ab",
                                                                   add_special_tokens=False)]
    ids = hf_ids(hf_tokenizer, MESSAGES)
    assert ids[0] == bos and ids[1] != bos


def test_chat_prompt_ids_are_hf_apply_chat_templates(chat_llm: LLM, hf_tokenizer: Any) -> None:
    out = chat_llm.chat(MESSAGES, GREEDY, use_tqdm=False)
    assert len(out) == 1
    expected_ids = hf_ids(hf_tokenizer, MESSAGES)
    assert list(out[0].prompt_token_ids) == expected_ids
    assert list(out[0].prompt_token_ids).count(hf_tokenizer.bos_token_id) == 1
    # The same ids given directly generate the same tokens.
    direct = chat_llm.generate({"prompt_token_ids": expected_ids}, GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == direct[0].outputs[0].token_ids
    assert out[0].prompt == chat_llm.apply_chat_template(MESSAGES)
    assert encode_chat(chat_llm.get_tokenizer(), out[0].prompt) == expected_ids
    assert_idle(chat_llm)


def test_a_list_of_conversations_comes_back_in_order(chat_llm: LLM) -> None:
    conversations = [MESSAGES, [{"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": [{"type": "text", "text": "Name a"},
                                                   {"type": "text", "text": "colour."}]}]]
    outs = chat_llm.chat(conversations, GREEDY, use_tqdm=False)
    singles = [chat_llm.chat(c, GREEDY, use_tqdm=False)[0] for c in conversations]
    assert [o.outputs[0].token_ids for o in outs] == [s.outputs[0].token_ids for s in singles]
    # Text parts are joined by newlines (as vLLM): the third conversation's prompt is that of
    # the plain string.
    plain = chat_llm.chat([{"role": "user", "content": "Name a\ncolour."}], GREEDY,
                          use_tqdm=False)[0]
    assert outs[2].prompt_token_ids == plain.prompt_token_ids
    assert outs[0].prompt_token_ids != outs[1].prompt_token_ids


def test_text_parts_are_joined_by_newlines() -> None:
    """As vLLM joins a message's text parts."""
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert template_messages([{"role": "user", "content": parts}]) == \
        [{"role": "user", "content": "a\nb"}]


def test_tool_messages_reach_the_template_with_their_call_id(chat_llm: LLM) -> None:
    """A tool's result given back (role ``tool``, as vLLM takes it) goes to the chat template
    with the call it answers."""
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    assert template_messages(messages)[1] == {"role": "tool", "content": "sunny",
                                              "tool_call_id": "call_1"}
    template = "{% for m in messages %}[{{ m['role'] }}:{{ m.get('tool_call_id', '') }}]" \
        "{% endfor %}"
    assert chat_llm.apply_chat_template(messages, chat_template=template) == \
        "[user:][tool:call_1]"


def test_assistant_tool_calls_reach_the_template_with_parsed_arguments(chat_llm: LLM) -> None:
    """An assistant message's ``tool_calls`` go to the chat template with their JSON arguments
    parsed to a dict (as vLLM and HF ``apply_chat_template`` pass them); bad calls are refused
    with the message's index."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    assert template_messages(messages)[1] == {
        "role": "assistant", "content": "",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather",
                                     "arguments": {"city": "Paris", "days": 2}}}]}
    template = ("{% for m in messages %}<{{ m['role'] }}>{% for c in m.get('tool_calls', []) %}"
                "[{{ c['function']['name'] }}({{ c['function']['arguments']['city'] }})]"
                "{% endfor %}{{ m['content'] }}{% endfor %}")
    assert chat_llm.apply_chat_template(messages, chat_template=template) == \
        "<user>Weather?<assistant>[get_weather(Paris)]<tool>sunny"
    bad_json = {**call, "function": {"name": "f", "arguments": "{city: Paris"}}
    for calls, match in (([bad_json], r"messages\[1\]\.tool_calls\[0\]\.function\.arguments "
                                      r"must be a JSON object"),
                         ([{"type": "function"}], r"messages\[1\]\.tool_calls\[0\] must be"),
                         ("call", r"messages\[1\]\.tool_calls must be a list")):
        with pytest.raises(InvalidRequestError, match=match):
            template_messages([messages[0], {"role": "assistant", "tool_calls": calls}])
    with pytest.raises(InvalidRequestError, match=r"only assistant messages carry tool calls"):
        template_messages([{"role": "user", "content": "x", "tool_calls": [call]}])


def test_continue_final_message_and_template_override(chat_llm: LLM, hf_tokenizer: Any) -> None:
    partial = [*MESSAGES, {"role": "assistant", "content": "Blu"}]
    out = chat_llm.chat(partial, GREEDY, use_tqdm=False, add_generation_prompt=False,
                        continue_final_message=True)[0]
    expected = hf_ids(hf_tokenizer, partial, add_generation_prompt=False,
                      continue_final_message=True)
    assert list(out.prompt_token_ids) == expected
    assert out.prompt.endswith("<|assistant|>Blu")
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    text = chat_llm.apply_chat_template(MESSAGES, chat_template=template)
    assert text == "[Be brief.][Name a colour.]"
    ids = chat_llm.chat(MESSAGES, GREEDY, use_tqdm=False, chat_template=template)[0]
    assert list(ids.prompt_token_ids) == hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("messages, kwargs, match", [
    ([{"role": "function", "content": "x"}], {}, r"messages\[0\]\.role must be one of"),
    ([{"role": "tool", "content": "x", "tool_call_id": 3}], {},
     r"messages\[0\]\.tool_call_id must be a string"),
    ([{"role": "user", "content": 5}], {}, r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], {},
     r"messages\[0\]\.content\[0\] must be a text part"),
    (["hello"], {}, "one conversation .* or a list of conversations, got a list of str"),
    ([MESSAGES[0], []], {}, "got a list of dict and list"),
    ([MESSAGES, []], {}, "messages must be a non-empty list"),
    (MESSAGES, {"continue_final_message": True},
     "add_generation_prompt and continue_final_message cannot both be true"),
    (MESSAGES, {"continue_final_message": True, "add_generation_prompt": False},
     "needs the last message to be the assistant's, got 'user'"),
    (MESSAGES, {"chat_template": "{{ raise_exception('no system role') }}"},
     "the chat template failed on these messages: no system role"),
    ("hello", {}, "messages must be a list"),
])
def test_bad_chat_input_is_refused_before_anything_runs(chat_llm: LLM, messages: Any,
                                                        kwargs: dict[str, Any],
                                                        match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        chat_llm.chat(messages, GREEDY, use_tqdm=False, **kwargs)
    assert_idle(chat_llm)


def test_cli_chat_encodes_one_bos(chat_llm: LLM, bos_chat_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(bos_chat_path), "--device", "cpu", "--dtype",
                 "float32", "--max-tokens", "12", "--temperature", "0", "--chat", "Hello"])
    assert code == 0
    expected = chat_llm.chat([{"role": "user", "content": "Hello"}],
                             SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert capsys.readouterr().out == expected[0].outputs[0].text + "\n"


@pytest.fixture(scope="module")
def server(bos_chat_path: Path) -> Iterator[ServerThread]:
    with server_in_thread(bos_chat_path, {"kv_cache_blocks": 256}) as thread:
        yield thread


def test_server_chat_and_tokenize_count_one_bos(server: ServerThread, chat_llm: LLM,
                                                hf_tokenizer: Any) -> None:
    base = server.base_url
    expected_ids = hf_ids(hf_tokenizer, MESSAGES)
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 12,
            "ignore_eos": True, "return_token_ids": True}
    resp = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
    choice = resp["choices"][0]
    assert resp["prompt_token_ids"] == expected_ids and "prompt_token_ids" not in choice
    assert resp["usage"]["prompt_tokens"] == len(expected_ids)
    offline = chat_llm.chat(MESSAGES, GREEDY, use_tqdm=False)[0].outputs[0]
    assert choice["token_ids"] == list(offline.token_ids)
    # vLLM's add_special_tokens: the tokenizer's BOS on top of the template's.
    doubled = httpx.post(base + "/v1/chat/completions", timeout=60,
                         json={**body, "add_special_tokens": True}).json()
    assert doubled["prompt_token_ids"] == [hf_tokenizer.bos_token_id, *expected_ids]

    tokenized = httpx.post(base + "/tokenize", json={"messages": MESSAGES}).json()
    assert tokenized["tokens"] == expected_ids and tokenized["count"] == len(expected_ids)
    plain = httpx.post(base + "/tokenize", json={"prompt": "ab"}).json()["tokens"]
    assert plain == hf_tokenizer.encode("ab")
    bare = httpx.post(base + "/tokenize", json={"prompt": "ab", "add_special_tokens": False})
    assert bare.json()["tokens"] == hf_tokenizer.encode("ab", add_special_tokens=False)
    completion = httpx.post(base + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "ab", "max_tokens": 1, "add_special_tokens": False,
        "return_token_ids": True}).json()
    assert completion["usage"]["prompt_tokens"] == 2


def test_server_continue_final_message_and_its_errors(server: ServerThread,
                                                      hf_tokenizer: Any) -> None:
    base = server.base_url
    partial = [*MESSAGES, {"role": "assistant", "content": "Blu"}]
    resp = httpx.post(base + "/tokenize", json={"messages": partial,
                                                "add_generation_prompt": False,
                                                "continue_final_message": True}).json()
    assert resp["tokens"] == hf_ids(hf_tokenizer, partial, add_generation_prompt=False,
                                    continue_final_message=True)
    both = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": partial, "continue_final_message": True})
    assert both.status_code == 400
    error = both.json()["error"]
    assert error["param"] == "continue_final_message"
    assert "cannot both be true" in error["message"]


def test_server_chat_echo_and_best_of(server: ServerThread) -> None:
    """vLLM's chat ``echo``: a last assistant message leads each choice's content (streamed as
    the chunk after the role); a last user message is not echoed. ``best_of``: the n choices of
    highest cumulative logprob among best_of samples, refused when streaming with n < best_of."""
    url = server.base_url + "/v1/chat/completions"
    partial = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "Blu"},
                                                            {"type": "text", "text": "e"}]}]
    body = {"messages": partial, "add_generation_prompt": False,
            "continue_final_message": True, "temperature": 0, "max_tokens": 5,
            "ignore_eos": True}
    plain = httpx.post(url, json=body, timeout=60).json()["choices"][0]["message"]["content"]
    echoed = httpx.post(url, json={**body, "echo": True}, timeout=60).json()
    assert echoed["choices"][0]["message"]["content"] == "Blu\ne" + plain
    assert echoed["usage"]["completion_tokens"] == 5
    with httpx.stream("POST", url, json={**body, "echo": True, "stream": True, "n": 2,
                                         "temperature": 1.0, "seed": 3}, timeout=60) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    for index in (0, 1):
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == index]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert deltas[1] == {"content": "Blu\ne"}
    # Without a generation prompt the answer continues the last message in its role (vLLM's
    # rule), so a last user message is the role, and with echo the start, of the answer.
    user_last = {**body, "messages": MESSAGES, "continue_final_message": False, "echo": True}
    user_plain = httpx.post(url, json={**user_last, "echo": False}, timeout=60).json()
    assert user_plain["choices"][0]["message"]["role"] == "user"
    user_echoed = httpx.post(url, json=user_last, timeout=60).json()["choices"][0]["message"]
    assert user_echoed == {"role": "user", "content": "Name a colour."
                           + user_plain["choices"][0]["message"]["content"]}
    with_prompt = httpx.post(url, json={**user_last, "add_generation_prompt": True},
                             timeout=60).json()["choices"][0]["message"]
    assert with_prompt["role"] == "assistant" and not with_prompt["content"].startswith("Name")

    sampled = {"messages": MESSAGES, "temperature": 1.0, "max_tokens": 4, "ignore_eos": True,
               "seed": 5, "logprobs": True}
    best = httpx.post(url, json={**sampled, "n": 2, "best_of": 4}, timeout=60).json()
    assert len(best["choices"]) == 2
    assert best["usage"]["completion_tokens"] == 8  # the answered choices' tokens, as vLLM
    totals = [sum(t["logprob"] for t in c["logprobs"]["content"]) for c in best["choices"]]
    every = httpx.post(url, json={**sampled, "n": 4}, timeout=60).json()  # the same 4 samples
    all_totals = sorted((sum(t["logprob"] for t in c["logprobs"]["content"])
                         for c in every["choices"]), reverse=True)
    assert totals == pytest.approx(all_totals[:2], abs=1e-4)
    refused = httpx.post(url, json={**sampled, "n": 1, "best_of": 2, "stream": True}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "best_of"


def _sse_chunks(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]


def test_server_chat_streams_token_ids_and_running_usage(server: ServerThread,
                                                         hf_tokenizer: Any) -> None:
    """Streamed chat with ``return_token_ids``: each role chunk carries the prompt's ids, each
    content chunk its new tokens, together the non-streamed answer's; with
    ``continuous_usage_stats`` every chunk has its choice's running usage, and the last the
    call's."""
    url = server.base_url + "/v1/chat/completions"
    body = {"messages": MESSAGES, "temperature": 0.8, "seed": 7, "max_tokens": 7,
            "ignore_eos": True, "return_token_ids": True, "n": 2}
    whole = httpx.post(url, json=body, timeout=60).json()
    prompt_ids = hf_ids(hf_tokenizer, MESSAGES)
    chunks = _sse_chunks(url, {**body, "stream_options": {"include_usage": True,
                                                          "continuous_usage_stats": True}})
    roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert [c["choices"][0]["index"] for c in roles] == [0, 1]
    assert all(c["prompt_token_ids"] == prompt_ids for c in roles)
    streamed: dict[int, list[int]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        streamed[choice["index"]] += choice.get("token_ids", [])
        done = len(streamed[choice["index"]])
        assert chunk["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": done,
                                  "total_tokens": len(prompt_ids) + done}
    assert streamed == {c["index"]: c["token_ids"] for c in whole["choices"]}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 14
    # stream_options given without include_usage: on, as vLLM defaults it; no running usage.
    plain = _sse_chunks(url, {**body, "return_token_ids": False, "stream_options": {}})
    assert all(c["usage"] is None for c in plain[:-1])
    assert plain[-1]["usage"]["completion_tokens"] == 14
    assert all("token_ids" not in c["choices"][0] and "prompt_token_ids" not in c
               for c in plain[:-1])


def test_server_chat_tool_calls_reach_the_template(server: ServerThread,
                                                   hf_tokenizer: Any) -> None:
    """An assistant message's tool calls sent over HTTP reach the template with their arguments
    parsed (the fixture's template prints them), as HF renders the same calls; structured
    outputs are refused, not ignored."""
    call = {"id": "c1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": "blue"}'}}
    messages = [*MESSAGES, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "content": "found", "tool_call_id": "c1"}]
    parsed = {**call, "function": {"name": "lookup", "arguments": {"q": "blue"}}}
    expected = hf_ids(hf_tokenizer, [*MESSAGES, {"role": "assistant", "content": "",
                                                 "tool_calls": [parsed]}, messages[-1]])
    assert '[lookup:{"q": "blue"}]' in hf_tokenizer.decode(expected)
    ids = httpx.post(server.base_url + "/tokenize", json={"messages": messages},
                     timeout=60).json()
    assert ids["tokens"] == expected
    url = server.base_url + "/v1/chat/completions"
    for extra, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"guided_choice": ["a", "b"]}, "guided_choice"),
                         ({"structured_outputs": {"regex": "a+"}}, "structured_outputs")):
        refused = httpx.post(url, json={"messages": MESSAGES, **extra}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param


SHOUT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                  "{% if shout %}!{% endif %}{% if add_generation_prompt %}>{% endif %}")


def test_server_chat_template_of_its_own_and_from_requests(bos_chat_path: Path,
                                                           hf_tokenizer: Any) -> None:
    """``--chat-template`` replaces the tokenizer's template for chat and /tokenize; a request's
    ``chat_template`` is refused with 400 unless the server trusts request templates, and then
    used; ``chat_template_kwargs`` reach the template on /tokenize too (vLLM's fields)."""
    own = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    expected_own = hf_tokenizer.encode("<Be brief.><Name a colour.>", add_special_tokens=False)
    expected_shout = hf_tokenizer.encode("[system]Be brief.[user]Name a colour.!>",
                                         add_special_tokens=False)
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 3,
            "ignore_eos": True, "return_token_ids": True}
    with server_in_thread(bos_chat_path, {"kv_cache_blocks": 64}, chat_template=own) as strict:
        url = strict.base_url
        chat = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        assert chat["prompt_token_ids"] == expected_own
        tokens = httpx.post(url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        assert tokens == expected_own
        for route, extra in (("/v1/chat/completions", body), ("/tokenize", {})):
            refused = httpx.post(url + route, timeout=60, json={
                **extra, "messages": MESSAGES, "chat_template": SHOUT_TEMPLATE})
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "chat_template"
            assert "--trust-request-chat-template" in refused.json()["error"]["message"]
    with server_in_thread(bos_chat_path, {"kv_cache_blocks": 64},
                          trust_request_chat_template=True) as trusting:
        url = trusting.base_url
        fields = {"chat_template": SHOUT_TEMPLATE, "chat_template_kwargs": {"shout": True}}
        chat = httpx.post(url + "/v1/chat/completions", json={**body, **fields},
                          timeout=60).json()
        assert chat["prompt_token_ids"] == expected_shout
        tokens = httpx.post(url + "/tokenize", json={"messages": MESSAGES, **fields}).json()
        assert tokens["tokens"] == expected_shout
        # Without a template of its own the request gets the tokenizer's (BOS_TEMPLATE).
        plain = httpx.post(url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        assert plain == hf_ids(hf_tokenizer, MESSAGES)


def test_chat_template_option_reads_a_file_or_an_inline_template(tmp_path: Path) -> None:
    from cacheflow_serve.chat_template import load_chat_template

    path = tmp_path / "t.jinja"
    path.write_text(SHOUT_TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == SHOUT_TEMPLATE
    assert load_chat_template(SHOUT_TEMPLATE) == SHOUT_TEMPLATE
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match=r"--chat-template: '/no/such.jinja' is neither a file "
                                         r"nor a Jinja template"):
        load_chat_template("/no/such.jinja")
    with pytest.raises(ValueError, match=r"--chat-template: the template does not parse"):
        load_chat_template("{% for m in messages %}{{ m }}")
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ValueError, match=r"--chat-template: cannot read"):
        load_chat_template(str(bad))


def test_serve_refuses_a_bad_chat_template_before_loading(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    code = main(["serve", "/no/such/model", "--chat-template", "/no/such.jinja",
                 "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() == ("cacheflow: error: --chat-template: '/no/such.jinja' is neither a "
                           "file nor a Jinja template (inline templates hold {{ ... }} or "
                           "{% ... %})")
