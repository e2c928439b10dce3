"""A model whose vocabulary is padded past its tokenizer's (as Qwen2.5's and Phi-3's are): the
ids the tokenizer does not know have no text, in prompts and in generated tokens, as in vLLM;
and a generation run that fails leaves the engine idle for the next one."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheflow_models.testing import BYTE_VOCAB_SIZE, save_tiny_checkpoint, tiny_llama_config
from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM

from serve_testutil import assert_idle

ONE_TORCH_THREAD = True  # see conftest.py
PADDED = BYTE_VOCAB_SIZE + 5  # ids BYTE_VOCAB_SIZE.. are the model's only


@pytest.fixture(scope="module")
def padded_llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("padded") / "llama",
                                tiny_llama_config(vocab_size=PADDED))
    return LLM(Path(path), device="cpu", dtype="float32")


def test_ids_past_the_tokenizer_have_no_text(padded_llm: LLM) -> None:
    tokenizer = padded_llm.get_tokenizer()
    assert len(tokenizer) == BYTE_VOCAB_SIZE
    extra = BYTE_VOCAB_SIZE + 2
    hello = tokenizer.encode("Hi", add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = padded_llm.generate([{"prompt_token_ids": [*hello, extra]}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6
    forced = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0,
                            logit_bias={extra: 100.0})
    for stream in (False, True):  # final-only text and the step-by-step text
        if stream:
            engine = padded_llm.engine
            engine.add_request("s", "Hi", forced)
            while engine.has_unfinished_requests():
                done = [o for o in engine.step() if o.finished]
            completion = done[0].outputs[0]
        else:
            completion = padded_llm.generate("Hi", forced, use_tqdm=False)[0].outputs[0]
        assert list(completion.token_ids) == [extra] * 3
        assert completion.text == ""
        assert completion.logprobs[0][extra].decoded_token == ""
    plain = padded_llm.generate("Hi", params, use_tqdm=False)[0].outputs[0]
    assert plain.text == tokenizer.decode(plain.token_ids, skip_special_tokens=True)
    assert_idle(padded_llm)


def test_a_failed_run_leaves_the_engine_idle(padded_llm: LLM,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = padded_llm.generate(["a", "b"], params, use_tqdm=False)
    engine = padded_llm.engine
    step = engine.step
    calls = []

    def failing_step(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a step failed")
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(RuntimeError, match="a step failed"):
        padded_llm.generate(["a", "b"], params, use_tqdm=False)
    monkeypatch.setattr(engine, "step", step)
    assert_idle(padded_llm)
    again = padded_llm.generate(["a", "b"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == \
        [o.outputs[0].token_ids for o in expected]
