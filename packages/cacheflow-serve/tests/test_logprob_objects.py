"""Reported logprobs are vLLM's ``Logprob`` objects (and still floats): the value, the token's
rank in the vocabulary and its text, checked against HF transformers' logits on the same
tokens."""

from __future__ import annotations

import pickle
from pathlib import Path

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
