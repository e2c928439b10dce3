"""Bad input gets a ValueError that says what was wrong, and the engine keeps serving."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from cacheflow_runtime import InvalidRequestError, SamplingParams
from cacheflow_serve import LLM

from serve_testutil import assert_idle, completions

ONE_TORCH_THREAD = True  # see conftest.py
MAX_MODEL_LEN = 64
VOCAB = 259
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
GOOD_PROMPTS: list[Any] = ["Hello", {"prompt_token_ids": [10, 20, 30, 40, 50]}, "A longer prompt."]


@pytest.fixture(scope="module")
def llm64(tiny_path: Path) -> LLM:
    return LLM(tiny_path, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def good(llm64: LLM) -> list[Any]:
    """What the good prompts give before any bad request was made."""
    outputs = llm64.generate(GOOD_PROMPTS, GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
    return completions(outputs)


def _assert_still_serving(llm: LLM, good: list[Any]) -> None:
    assert_idle(llm)
    assert completions(llm.generate(GOOD_PROMPTS, GREEDY, use_tqdm=False)) == good
    assert_idle(llm)


BAD_PROMPTS: dict[str, tuple[Any, str]] = {
    "too-long-ids": ({"prompt_token_ids": [5] * (MAX_MODEL_LEN + 1)},
                     r"the prompt has 65 tokens, more than max_model_len \(64\)"),
    "too-long-text": ("x" * 100, r"the prompt has 100 tokens, more than max_model_len \(64\)"),
    "empty-text": ("", r"the prompt is empty"),
    "empty-ids": ({"prompt_token_ids": []}, r"the prompt is empty"),
    "negative-id": ({"prompt_token_ids": [5, -1, 7]},
                    r"prompt token ids must be integers in \[0, 259\); got \[-1\]"),
    "id-equal-to-vocab": ({"prompt_token_ids": [5, VOCAB]},
                          r"prompt token ids must be integers in \[0, 259\); got \[259\]"),
    "ids-far-out": ({"prompt_token_ids": [10**6, 3, -(10**6)]},
                    r"in \[0, 259\); got \[1000000, -1000000\]"),
    "float-id": ({"prompt_token_ids": [5, 3.0]}, r"must be integers in \[0, 259\); got \[3\.0\]"),
    "ids-not-a-list": ({"prompt_token_ids": "1 2 3"}, r"prompt_token_ids must be a list"),
    "not-a-prompt": (["fine", 42], r"a prompt must be a string or a dict .* got int"),
    "dict-without-prompt": ([{"text": "hi"}], r"a prompt must be a string or a dict"),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_prompt_is_rejected_and_the_engine_keeps_serving(
        llm64: LLM, good: list[Any], name: str) -> None:
    prompt, message = BAD_PROMPTS[name]
    with pytest.raises(ValueError, match=message):
        llm64.generate(prompt, GREEDY, use_tqdm=False)
    _assert_still_serving(llm64, good)


def test_numpy_integer_token_ids_are_served_as_ints(llm64: LLM, good: list[Any]) -> None:
    """Token ids from a NumPy array (np.int64, np.int32) are integers like Python's."""
    import numpy as np

    ids = GOOD_PROMPTS[1]["prompt_token_ids"]
    for dtype in (np.int64, np.int32):
        prompt = {"prompt_token_ids": list(np.array(ids, dtype=dtype))}
        out = llm64.generate(prompt, GREEDY, use_tqdm=False)[0]
        assert completions([out]) == [good[1]]
        assert out.prompt_token_ids == ids and all(type(t) is int for t in out.prompt_token_ids)
    with pytest.raises(ValueError, match=r"in \[0, 259\); got \[np.int64\(259\)\]"):
        llm64.generate({"prompt_token_ids": list(np.array([5, VOCAB]))}, GREEDY, use_tqdm=False)


def test_prompt_up_to_max_model_len_is_served_and_capped(llm64: LLM) -> None:
    prompt = {"prompt_token_ids": list(range(3, 3 + MAX_MODEL_LEN - 3))}
    out = llm64.generate(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3  # max_model_len is reached first
    assert out.finish_reason == "length"
    with pytest.raises(ValueError, match="more than max_model_len"):
        llm64.generate({"prompt_token_ids": list(range(3, 3 + MAX_MODEL_LEN + 1))}, GREEDY,
                       use_tqdm=False)
    full = llm64.generate({"prompt_token_ids": list(range(3, 3 + MAX_MODEL_LEN))},
                          GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(full.token_ids) == 1 and full.finish_reason == "length"
    assert_idle(llm64)


def test_truncate_prompt_tokens_takes_a_text_prompt_of_any_length(llm64: LLM) -> None:
    """Past the character bound a text prompt is refused untokenized, unless
    truncate_prompt_tokens keeps only its tail (as in vLLM)."""
    long = "a" * (llm64._max_prompt_chars + 100)
    with pytest.raises(InvalidRequestError) as info:
        llm64.generate(long, GREEDY, use_tqdm=False)
    assert info.value.code == "context_length_exceeded"
    keep = SamplingParams(temperature=0, max_tokens=2, truncate_prompt_tokens=10)
    out = llm64.generate([long, "short"], keep, use_tqdm=False)[0]
    assert out.prompt_token_ids == llm64.tokenizer.encode(long)[-10:]
    assert len(out.outputs[0].token_ids) == 2
    assert_idle(llm64)


@pytest.mark.parametrize("bad_index", [0, 2, 3])
def test_bad_prompt_in_a_batch_fails_the_batch_and_later_batches_are_correct(
        llm64: LLM, good: list[Any], bad_index: int) -> None:
    prompts = list(GOOD_PROMPTS) + ["last one"]
    prompts[bad_index] = {"prompt_token_ids": [1, 2, VOCAB + 5]}
    with pytest.raises(ValueError, match=r"got \[264\]"):
        llm64.generate(prompts, GREEDY, use_tqdm=False)
    _assert_still_serving(llm64, good)


def test_a_bad_sampling_params_list_fails_the_batch(llm64: LLM, good: list[Any]) -> None:
    with pytest.raises(ValueError, match="got 2 sampling_params for 3 prompts"):
        llm64.generate(GOOD_PROMPTS, [GREEDY, GREEDY], use_tqdm=False)
    params = [GREEDY, GREEDY, "greedy"]
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams, got str"):
        llm64.generate(GOOD_PROMPTS, params, use_tqdm=False)  # type: ignore[arg-type]
    _assert_still_serving(llm64, good)


def test_a_request_wider_than_the_token_budget_is_rejected(tiny_path: Path) -> None:
    """n sequences decode n tokens a step: more than the step's token budget never fit (the
    request used to wait forever)."""
    llm = LLM(tiny_path, device="cpu", dtype="float32", max_num_batched_tokens=3)
    with pytest.raises(InvalidRequestError, match=r"^n \(4\) is larger than "
                                                  r"max_num_batched_tokens \(3\)") as info:
        llm.generate("hi", SamplingParams(n=4, temperature=0.8, max_tokens=4), use_tqdm=False)
    assert info.value.param == "n"
    with pytest.raises(InvalidRequestError, match=r"^best_of \(5\) is larger") as info:
        llm.generate("hi", SamplingParams(n=2, best_of=5, temperature=0.8, max_tokens=4),
                     use_tqdm=False)
    assert info.value.param == "best_of"
    out = llm.generate("hi", SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=4),
                       use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [4, 4, 4]
    assert_idle(llm)


def test_a_request_too_big_for_the_kv_cache_is_rejected(tiny_path: Path) -> None:
    small = LLM(tiny_path, device="cpu", dtype="float32", block_size=8, kv_cache_blocks=4,
                swap_space=0.01)
    with pytest.raises(ValueError, match=r"needs up to 5 KV-cache blocks \(the keys and values "
                                         r"of 39 tokens\) but the cache has only 4"):
        small.generate({"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=20),
                       use_tqdm=False)
    with pytest.raises(ValueError, match=r"^n \(300\) is larger than max_num_seqs \(256\)"):
        small.generate("hi", SamplingParams(n=300, max_tokens=1), use_tqdm=False)
    out = small.generate({"prompt_token_ids": [5] * 20}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8
    assert_idle(small)


BAD_PARAMS: list[tuple[dict[str, Any], str, Any]] = [
    (dict(temperature=-1), "temperature", -1),
    (dict(temperature=float("nan")), "temperature", float("nan")),
    (dict(top_p=0), "top_p", 0),
    (dict(top_p=1.5), "top_p", 1.5),
    (dict(top_k=-2), "top_k", -2),
    (dict(n=0), "n", 0),
    (dict(n=3, best_of=2), "best_of", 2),
    (dict(temperature=0, n=2), "n", 2),
    (dict(temperature=0, n=2, best_of=3), "n", 2),
    (dict(temperature=0, best_of=2), "best_of", 2),
    (dict(max_tokens=0), "max_tokens", 0),
    (dict(min_tokens=5, max_tokens=4), "min_tokens", 5),
    (dict(logprobs=100), "logprobs", 100),
    (dict(logprobs=-1), "logprobs", -1),
    (dict(prompt_logprobs=21), "prompt_logprobs", 21),
    (dict(stop=["ok", ""]), "stop", ["ok", ""]),
    (dict(stop_token_ids=[-3]), "stop_token_ids", [-3]),
    (dict(presence_penalty=3), "presence_penalty", 3),
    (dict(repetition_penalty=0), "repetition_penalty", 0),
    (dict(repetition_penalty=-1.5), "repetition_penalty", -1.5),
]


@pytest.mark.parametrize("kwargs,field,value", BAD_PARAMS,
                         ids=[f"{f}={v!r}" for _, f, v in BAD_PARAMS])
def test_invalid_sampling_params_name_the_field(kwargs: dict[str, Any], field: str,
                                                value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} must be .*, got "
                                         rf"{re.escape(repr(value))}$"):
        SamplingParams(**kwargs)


def test_add_request_rejects_a_duplicate_id_and_keeps_the_first(llm64: LLM,
                                                                good: list[Any]) -> None:
    engine = llm64.engine
    ids = [10, 20, 30, 40, 50]
    engine.add_request("dup", None, GREEDY, ids)
    with pytest.raises(ValueError, match=r"request id 'dup' is already in use"):
        engine.add_request("dup", "something else", GREEDY)
    with pytest.raises(ValueError, match=r"sampling_params must be a SamplingParams, got dict"):
        engine.add_request("other", "x", {"temperature": 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"a request needs a prompt or prompt_token_ids"):
        engine.add_request("other", None, GREEDY)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["dup"]
    assert finished[0].prompt_token_ids == ids
    assert completions(finished) == [good[1]]
    _assert_still_serving(llm64, good)
    # A finished request's id may be used again.
    engine.add_request("dup", None, GREEDY, ids)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert completions(finished) == [good[1]]
    assert_idle(llm64)


# ------------------------------------------------------------------------------- checkpoints


def _broken_copy(tiny_path: Path, tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    path = tmp_path / "broken"
    shutil.copytree(tiny_path, path)
    edit(path)
    return path


def _load_fails(path: Path, error: type[Exception], message: str) -> str:
    dtype = torch.get_default_dtype()
    with pytest.raises(error, match=message) as info:
        LLM(path, device="cpu", dtype="float32")
    assert torch.get_default_dtype() == dtype  # nothing leaks out of the failed load
    return str(info.value)


def _set_config(**fields: Any) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        config.update(fields)
        (path / "config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("model_type", ["foo_bar", "bert"])
def test_unknown_architecture_lists_the_supported_ones(tiny_path: Path, tmp_path: Path,
                                                       model_type: str) -> None:
    path = _broken_copy(tiny_path, tmp_path, _set_config(architectures=["FooForCausalLM"],
                                                         model_type=model_type))
    _load_fails(path, ValueError, r"model architecture 'FooForCausalLM' is not supported; "
                                  r"supported architectures: .*LlamaForCausalLM")


def test_missing_weight_file_says_what_was_expected(tiny_path: Path, tmp_path: Path) -> None:
    path = _broken_copy(tiny_path, tmp_path, lambda p: (p / "model.safetensors").unlink())
    message = _load_fails(path, ValueError, r"no checkpoint found in .*: expected "
                                            r"\*\.safetensors, \*\.bin or \*\.gguf")
    assert str(path) in message and "config.json" in message


@pytest.mark.parametrize("keep", ["100 bytes", "half", "all but 16 bytes"])
def test_truncated_weight_file_is_named(tiny_path: Path, tmp_path: Path, keep: str) -> None:
    def truncate(path: Path) -> None:
        file = path / "model.safetensors"
        size = file.stat().st_size
        sizes = {"100 bytes": 100, "half": size // 2, "all but 16 bytes": size - 16}
        os.truncate(file, sizes[keep])

    path = _broken_copy(tiny_path, tmp_path, truncate)
    _load_fails(path, ValueError,
                rf"cannot read checkpoint file {re.escape(str(path / 'model.safetensors'))}: ")


def _rewrite_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        tensors = load_file(path / "model.safetensors")
        change(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return edit


def test_missing_tensor_is_named(tiny_path: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    path = _broken_copy(tiny_path, tmp_path, _rewrite_weights(lambda t: t.pop(name)))
    _load_fails(path, ValueError, rf"parameters not found in the checkpoint: \['{name}'\]")


def test_unexpected_tensor_is_named(tiny_path: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.extra_proj.weight"
    path = _broken_copy(tiny_path, tmp_path,
                        _rewrite_weights(lambda t: t.update({name: torch.zeros(2, 2)})))
    _load_fails(path, ValueError, rf"tensors in the checkpoint that no parameter takes: "
                                  rf"\['{name}'\]")


def test_misshapen_tensor_is_named(tiny_path: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.o_proj.weight"
    path = _broken_copy(tiny_path, tmp_path,
                        _rewrite_weights(lambda t: t.update({name: torch.zeros(64, 32)})))
    _load_fails(path, ValueError, rf"checkpoint tensor '{name}'")


def test_a_non_list_prompt_is_a_value_error(llm64: LLM, good: list[Any]) -> None:
    with pytest.raises(ValueError, match="prompts must be a string, a dict or a list of them, "
                                         "got int"):
        llm64.generate(42, GREEDY, use_tqdm=False)  # type: ignore[arg-type]
    _assert_still_serving(llm64, good)


@pytest.mark.parametrize("mode,best_of", [("swap", 1), ("recompute", 3)])
def test_requests_that_may_swap_need_swap_space(tiny_path: Path, mode: str,
                                                best_of: int) -> None:
    llm = LLM(tiny_path, device="cpu", dtype="float32", block_size=8, kv_cache_blocks=32,
              swap_space=0, preemption_mode=mode)
    params = SamplingParams(n=1, best_of=best_of, temperature=0.8, seed=1, max_tokens=8)
    with pytest.raises(ValueError, match=r"swap space holds 0; raise swap_space"):
        llm.generate("Hello", params, use_tqdm=False)
    assert_idle(llm)
    if mode == "recompute":  # a single sequence never needs swap space there
        out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 8
