"""Reported logprobs are vLLM's ``Logprob`` objects (and still floats): the value, the token's
rank in the vocabulary and its text, checked against HF transformers' logits on the same
tokens."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cacheflow_runtime import Logprob, SamplingParams
from cacheflow_serve import LLM

ONE_TORCH_THREAD = True  # see conftest.py
PROMPT = "The quick brown fox"


def _hf_logprobs(path: Path, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position of ``token_ids`` (float64)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def _rank(logprobs: torch.Tensor, token_id: int) -> int:
    return int((logprobs > logprobs[token_id]).sum()) + 1


def test_logprobs_carry_rank_and_text(llm: LLM, tiny_path: Path) -> None:
    params = SamplingParams(temperature=1.5, seed=3, max_tokens=12, ignore_eos=True,
                            logprobs=3, prompt_logprobs=2)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    completion = out.outputs[0]
    prompt_ids, tokens = list(out.prompt_token_ids), list(completion.token_ids)
    reference = _hf_logprobs(tiny_path, prompt_ids + tokens)
    tokenizer = llm.get_tokenizer()
    ranks = []
    for i, (token, entry) in enumerate(zip(tokens, completion.logprobs)):
        row = reference[len(prompt_ids) - 1 + i]
        chosen = entry[token]
        assert isinstance(chosen, Logprob) and isinstance(chosen, float)
        assert chosen.logprob == float(chosen)
        # temperature scaling keeps the order, so the rank is HF's raw one
        assert chosen.rank == _rank(row, token)
        ranks.append(chosen.rank)
        top = sorted((v for v in entry.values() if v.rank <= 3), key=lambda v: v.rank)
        assert [v.rank for v in top] == [1, 2, 3]
        assert [v.logprob for v in top] == sorted((v.logprob for v in top), reverse=True)
        assert all(v.decoded_token == tokenizer.decode([t]) for t, v in entry.items())
    assert max(ranks) > 3  # some sampled tokens lie outside the top 3 (their rank is exact)
    prompt_entries = out.prompt_logprobs
    assert prompt_entries[0] is None
    for p, entry in enumerate(prompt_entries[1:], start=1):
        target = entry[prompt_ids[p]]
        assert target.rank == _rank(reference[p - 1], prompt_ids[p])
        assert abs(target.logprob - float(reference[p - 1, prompt_ids[p]])) < 1e-4
        assert target.decoded_token == tokenizer.decode([prompt_ids[p]])
    copy = pickle.loads(pickle.dumps(completion.logprobs[0][tokens[0]]))
    assert (copy.logprob, copy.rank, copy.decoded_token) == (
        completion.logprobs[0][tokens[0]].logprob, completion.logprobs[0][tokens[0]].rank,
        completion.logprobs[0][tokens[0]].decoded_token)


def test_greedy_tokens_rank_first(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    completion = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert [entry[t].rank for t, entry in zip(completion.token_ids, completion.logprobs)] == \
        [1] * 8
    assert all(len(entry) == 1 for entry in completion.logprobs)


def test_logprobs_are_the_raw_distribution_by_default(llm: LLM, tiny_path: Path) -> None:
    """vLLM's default ``logprobs_mode="raw_logprobs"``: the model's own log_softmax, whatever
    temperature, penalties and bias did to the draw, so output logprobs and prompt logprobs of
    the same token at the same position agree; ``cumulative_logprob`` sums them."""
    params = SamplingParams(temperature=0.6, top_k=5, presence_penalty=1.5, seed=11,
                            logit_bias={7: 3.0}, max_tokens=10, ignore_eos=True, logprobs=4)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    completion = out.outputs[0]
    prompt_ids, tokens = list(out.prompt_token_ids), list(completion.token_ids)
    reference = _hf_logprobs(tiny_path, prompt_ids + tokens)
    total = 0.0
    for i, (token, entry) in enumerate(zip(tokens, completion.logprobs)):
        row = reference[len(prompt_ids) - 1 + i]
        for t, value in entry.items():
            assert abs(value.logprob - float(row[t])) < 1e-4, (i, t)
            assert value.rank == _rank(row, t)
        total += entry[token].logprob
    assert abs(completion.cumulative_logprob - total) < 1e-4
    again = llm.generate({"prompt_token_ids": prompt_ids + tokens},
                         SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    for i, token in enumerate(tokens):
        assert abs(again.prompt_logprobs[len(prompt_ids) + i][token].logprob
                   - completion.logprobs[i][token].logprob) < 1e-4


def test_processed_logprobs_mode_reports_the_sampled_distribution(tiny_path: Path) -> None:
    """``logprobs_mode="processed_logprobs"``: log_softmax of the logits divided by the
    temperature with top-k applied: the five kept tokens carry the whole mass, the rest -inf."""
    llm = LLM(tiny_path, max_model_len=64, kv_cache_blocks=16, swap_space=0.01,
              logprobs_mode="processed_logprobs")
    params = SamplingParams(temperature=0.6, top_k=5, seed=11, max_tokens=6, ignore_eos=True,
                            logprobs=6)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    completion = out.outputs[0]
    prompt_ids, tokens = list(out.prompt_token_ids), list(completion.token_ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0].double()
    for i, (token, entry) in enumerate(zip(tokens, completion.logprobs)):
        scaled = logits[len(prompt_ids) - 1 + i] / 0.6
        kept = torch.full_like(scaled, float("-inf"))
        top = scaled.topk(5).indices
        kept[top] = scaled[top]
        want = torch.log_softmax(kept, dim=-1)
        assert token in top.tolist()
        finite = {t: v.logprob for t, v in entry.items() if v.logprob > float("-inf")}
        assert set(finite) == set(top.tolist())
        for t, value in finite.items():
            assert abs(value - float(want[t])) < 1e-4, (i, t)
    with pytest.raises(ValueError, match="logprobs_mode must be one of raw_logprobs"):
        LLM(tiny_path, logprobs_mode="processed")


@pytest.mark.parametrize("mode", ["raw_logits", "raw_logprobs"])
def test_beam_search_reports_the_scores_it_ranks_by_in_every_mode(tiny_path: Path,
                                                                   mode: str) -> None:
    """A beam's cumulative logprob is the sum of its tokens' log_softmax after the penalties
    (what it is ranked by, as HF's beam scores), whether or not logprobs are asked for, and the
    tokens' reported logprobs are those same values, in every logprobs_mode."""
    llm = LLM(tiny_path, max_model_len=64, kv_cache_blocks=32, swap_space=0.01,
              logprobs_mode=mode)
    base = dict(use_beam_search=True, best_of=3, temperature=0, max_tokens=6, ignore_eos=True,
                repetition_penalty=1.5)
    plain = llm.generate(PROMPT, SamplingParams(**base), use_tqdm=False)[0].outputs
    asked = llm.generate(PROMPT, SamplingParams(**base, logprobs=3), use_tqdm=False)[0].outputs
    assert [o.token_ids for o in plain] == [o.token_ids for o in asked]
    for a, b in zip(plain, asked):
        assert abs(a.cumulative_logprob - b.cumulative_logprob) < 1e-5
        chosen = [entry[t].logprob for t, entry in zip(b.token_ids, b.logprobs)]
        assert all(value <= 0 for value in chosen)  # logprobs, never logits
        assert abs(sum(chosen) - b.cumulative_logprob) < 1e-4
