"""Names a vLLM user's offline script reaches for: ``LLM`` keywords (``trust_remote_code``,
``disable_log_stats``, ``seed=None``), ``llm.llm_engine``, ``chat_template_kwargs``,
``SamplingParams.clone`` / ``seed=-1`` / ``spaces_between_special_tokens``, ``TokensPrompt`` and
``TextPrompt``, ``RequestOutput.metrics``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheflow_runtime import InvalidRequestError, SamplingParams
from cacheflow_serve import LLM, BeamSearchParams, TextPrompt, TokensPrompt

ONE_TORCH_THREAD = True  # see conftest.py
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def test_vllm_keywords_and_engine_alias(tiny_path: Path, llm: LLM) -> None:
    llm_v = LLM(tiny_path, device="cpu", dtype="float32", trust_remote_code=True,
                disable_log_stats=True, seed=None)
    assert llm_v.llm_engine is llm_v.engine
    ours = llm_v.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert ours == llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=r"trust_remote_code=...\) must be True or False"):
        LLM(tiny_path, device="cpu", trust_remote_code="yes")


def test_prompt_dicts_and_output_metrics(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode("Hello", add_special_tokens=False)
    prompts = [TokensPrompt(prompt_token_ids=ids), TextPrompt(prompt="Hello")]
    by_ids, by_text = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids
    metrics = by_ids.metrics
    assert metrics.arrival_time is not None and metrics.first_token_time is not None
    assert 0 <= metrics.time_to_first_token < 60
    assert by_ids.lora_request is None and by_ids.outputs[0].lora_request is None


def test_chat_template_kwargs_reach_the_template(chat_tiny_path: Path) -> None:
    chat_llm = LLM(chat_tiny_path, device="cpu", dtype="float32")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" \
        "{% if shout %}!{% endif %}"
    messages = [{"role": "user", "content": "Hi"}]
    assert chat_llm.apply_chat_template(messages, chat_template=template) == "Hi"
    assert chat_llm.apply_chat_template(messages, chat_template=template,
                                        chat_template_kwargs={"shout": True}) == "Hi!"
    out = chat_llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template,
                        chat_template_kwargs={"shout": True})[0]
    assert out.prompt == "Hi!"
    with pytest.raises(InvalidRequestError, match="chat_template_kwargs cannot set "
                                                  "add_generation_prompt"):
        chat_llm.chat(messages, GREEDY, chat_template_kwargs={"add_generation_prompt": False})


def test_sampling_params_vllm_methods() -> None:
    params = SamplingParams(temperature=0.7, stop=["x"], seed=-1,
                            spaces_between_special_tokens=False)
    assert params.seed is None  # vLLM's "no seed"
    copy = params.clone()
    assert copy == params and copy is not params and copy.stop is not params.stop
    # stop is always a list, as vLLM's
    assert SamplingParams(stop="end").stop == ["end"] and SamplingParams().stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    with pytest.raises(ValueError, match="spaces_between_special_tokens must be True or False"):
        SamplingParams(spaces_between_special_tokens="no")


def test_beam_search_call_matches_the_sampling_params_search(llm: LLM) -> None:
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    outs = llm.beam_search(["Hello", {"prompt_token_ids": [5, 6, 7]}], params)
    same = llm.generate(["Hello", {"prompt_token_ids": [5, 6, 7]}],
                        SamplingParams(n=3, best_of=3, use_beam_search=True, temperature=0,
                                       max_tokens=6, ignore_eos=True), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for beams, out in zip(outs, same):
        assert [b.tokens for b in beams.sequences] == [
            list(out.prompt_token_ids) + list(c.token_ids) for c in out.outputs]
        assert [b.cum_logprob for b in beams.sequences] == pytest.approx(
            [c.cumulative_logprob for c in out.outputs])
        for beam in beams.sequences:
            assert beam.text == tokenizer.decode(beam.tokens, skip_special_tokens=True)
            assert len(beam.logprobs) == 6 and beam.finish_reason == "length"
    greedy = llm.beam_search(["Hello"], BeamSearchParams(beam_width=1, max_tokens=4,
                                                         ignore_eos=True))[0].sequences
    expected = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                            use_tqdm=False)[0]
    assert [b.tokens for b in greedy] == [
        list(expected.prompt_token_ids) + list(expected.outputs[0].token_ids)]
    with pytest.raises(ValueError, match="beam_width must be a positive integer"):
        llm.beam_search(["Hello"], BeamSearchParams(beam_width=0, max_tokens=4))
