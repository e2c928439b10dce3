"""``SamplingParams.logit_bias``, ``allowed_token_ids``, ``bad_words`` and
``truncate_prompt_tokens`` through ``LLM.generate``: the first three move the prompt step's and
every decode step's choice (such decodes leave the columnar path), ids outside the vocabulary
are refused before anything runs, and truncation keeps the prompt's last tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cacheflow_runtime import InvalidArgumentError, InvalidRequestError, SamplingParams
from cacheflow_serve import LLM

from serve_testutil import assert_idle

ONE_TORCH_THREAD = True  # see conftest.py
PROMPTS = ["Hello, my name is", "abcabcab", "The capital"]


def test_banning_the_greedy_token_picks_the_runner_up(llm: LLM) -> None:
    base = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                logprobs=2), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                             logit_bias={out.outputs[0].token_ids[0]: -100}) for out in base]
    biased = llm.generate(PROMPTS, params, use_tqdm=False)
    for before, after in zip(base, biased):
        first = before.outputs[0].logprobs[0]
        chosen = before.outputs[0].token_ids[0]
        runner_up = max((t for t in first if t != chosen), key=first.__getitem__)
        assert after.outputs[0].token_ids[0] == runner_up
    # Banning a token every later step never picks it, also in decode steps.
    banned = base[1].outputs[0].token_ids[1]
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                  logit_bias={banned: -100}), use_tqdm=False)
    assert banned not in out[0].outputs[0].token_ids
    assert_idle(llm)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_large_bias_forces_the_token_at_every_step(llm: LLM, temperature: float) -> None:
    token = 70  # a byte token of the tiny vocabulary
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=10, ignore_eos=True,
                            logit_bias={token: 100, token + 1: -5})
    plain = SamplingParams(temperature=temperature, seed=3, max_tokens=10, ignore_eos=True)
    outs = llm.generate(PROMPTS[:2], [params, plain], use_tqdm=False)
    assert list(outs[0].outputs[0].token_ids) == [token] * 10
    alone = llm.generate(PROMPTS[1], plain, use_tqdm=False)[0]
    assert outs[1].outputs[0].token_ids == alone.outputs[0].token_ids  # its neighbour's bias
    # is not its own


def test_a_bias_outside_the_vocabulary_is_refused(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(InvalidArgumentError, match=rf"SamplingParams.logit_bias names token ids "
                                                   rf"outside the vocabulary \[0, {vocab}\): "
                                                   rf"\[{vocab}, {vocab + 7}\]") as info:
        llm.generate(PROMPTS, [SamplingParams(), SamplingParams(),
                               SamplingParams(logit_bias={vocab + 7: 1.0, vocab: -1.0, 5: 2.0})],
                     use_tqdm=False)
    assert info.value.field == "SamplingParams.logit_bias"
    assert_idle(llm)


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_allowed_token_ids_hold_at_every_step(llm: LLM, temperature: float) -> None:
    allowed = [70, 71, 72]
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=temperature, seed=9, max_tokens=12,
                                                 ignore_eos=True, allowed_token_ids=allowed,
                                                 logprobs=5)] * len(PROMPTS), use_tqdm=False)
    free = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=5),
                        use_tqdm=False)
    for out, unconstrained in zip(outs, free):
        tokens = out.outputs[0].token_ids
        assert set(tokens) <= set(allowed) and len(tokens) == 12
        # The reported logprobs are the model's raw ones (vLLM's default logprobs_mode): the
        # first step's top 5 are those of a request without the constraint.
        first, raw = out.outputs[0].logprobs[0], unconstrained.outputs[0].logprobs[0]
        top = sorted(raw, key=lambda t: -raw[t])[:5]
        assert all(math.isclose(first[t], raw[t], abs_tol=1e-5) for t in top)


def test_greedy_under_allowed_ids_picks_the_best_allowed(llm: LLM) -> None:
    base = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=3),
                        use_tqdm=False)
    for prompt, out in zip(PROMPTS, base):
        first = out.outputs[0].logprobs[0]
        ranked = sorted(first, key=first.__getitem__, reverse=True)
        got = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1,
                                                  allowed_token_ids=[ranked[2], ranked[1]]),
                           use_tqdm=False)[0]
        assert got.outputs[0].token_ids[0] == ranked[1]


def test_allowed_ids_outside_the_vocabulary_are_refused(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(InvalidArgumentError, match=rf"SamplingParams.allowed_token_ids names "
                                                   rf"token ids outside the vocabulary "
                                                   rf"\[0, {vocab}\): \[{vocab}\]"):
        llm.generate(PROMPTS[0], SamplingParams(allowed_token_ids=[5, vocab, vocab]),
                     use_tqdm=False)
    assert_idle(llm)


def _contains(ids: list[int], seq: list[int]) -> bool:
    return any(ids[i:i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))


def test_bad_words_never_appear(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    checked = 0
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy, use_tqdm=False)):
        ids = list(out.outputs[0].token_ids)
        # A two-token word of the greedy output whose text encodes back to the same tokens.
        pairs = [i for i in range(1, len(ids) - 1) if tokenizer.encode(
            tokenizer.decode(ids[i:i + 2]), add_special_tokens=False) == ids[i:i + 2]]
        if not pairs:
            continue
        i = pairs[0]
        word = tokenizer.decode(ids[i:i + 2])
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, bad_words=[word])
        got = list(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)
        assert params.bad_words_token_ids[0] == ids[i:i + 2]
        assert not _contains(got, ids[i:i + 2])
        assert got[:i + 1] == ids[:i + 1]  # the same until the word's last token
        checked += 1
    assert checked >= 2
    assert_idle(llm)


def test_bad_words_without_a_tokenizer_are_refused(tiny_path: Path) -> None:
    bare = LLM(tiny_path, device="cpu", dtype="float32", skip_tokenizer_init=True)
    with pytest.raises(InvalidArgumentError, match="bad_words need a tokenizer"):
        bare.generate({"prompt_token_ids": [5, 6]}, SamplingParams(bad_words=["x"]),
                      use_tqdm=False)
    assert_idle(bare)


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm: LLM) -> None:
    max_len = llm.engine.model_config.max_model_len
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 8  # over max_model_len
    ids = llm.get_tokenizer().encode(long_prompt)
    assert len(ids) > max_len
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    for keep, kept in ((17, ids[-17:]), (-1, ids[-max_len:])):
        out = llm.generate(long_prompt, SamplingParams(truncate_prompt_tokens=keep, **greedy),
                           use_tqdm=False)[0]
        assert list(out.prompt_token_ids) == kept
        direct = llm.generate({"prompt_token_ids": kept}, SamplingParams(**greedy),
                              use_tqdm=False)[0]
        assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate(long_prompt, SamplingParams(**greedy), use_tqdm=False)
    assert_idle(llm)
