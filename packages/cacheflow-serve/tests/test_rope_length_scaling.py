"""Rotary scaling that rotates a prompt by its length (dynamic NTK, LongRoPE) gives HF
transformers' greedy tokens through ``LLM`` however the prompt reaches the model: cut into
chunked-prefill steps, or after a shorter prompt with the same first block went through the
prefix cache (HF rotates every key of a prompt for the whole prompt's length)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_models.testing import save_tiny_checkpoint, tiny_llama_config
from cacheflow_models.testing.fidelity import hf_greedy
from cacheflow_serve import LLM, SamplingParams

NEW_TOKENS = 8
SCALINGS = {
    # trained on 24 positions, stretched 4x: prompts past 24 tokens get their own base
    "dynamic": dict(max_position_embeddings=24,
                    rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    # the long factors past 32 tokens
    "longrope": dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "longrope", "original_max_position_embeddings": 32,
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.3 * i for i in range(8)]}),
}


def _prompt(n: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(7)).tolist()


def _greedy(llm: LLM, prompt: list[int]) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


@pytest.fixture(scope="module", params=sorted(SCALINGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    return save_tiny_checkpoint(path, tiny_llama_config(**SCALINGS[request.param]))


def test_chunked_prefill_matches_hf(checkpoint: Path) -> None:
    prompt = _prompt(44)
    llm = LLM(model=str(checkpoint), dtype="float32", max_num_batched_tokens=16,
              enable_prefix_caching=False)
    assert _greedy(llm, prompt) == hf_greedy(checkpoint, prompt, NEW_TOKENS)[0]


def test_prefix_cache_keeps_prompts_rotated_for_other_lengths_apart(checkpoint: Path) -> None:
    prompt = _prompt(44)
    llm = LLM(model=str(checkpoint), dtype="float32")
    for earlier in (prompt[:20], prompt[:40]):  # within the trained length, then past it
        assert _greedy(llm, earlier) == hf_greedy(checkpoint, earlier, NEW_TOKENS)[0]
    assert _greedy(llm, prompt) == hf_greedy(checkpoint, prompt, NEW_TOKENS)[0]
    # The same prompt again shares every full block it wrote (same length, same rotation).
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    again = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 32
    assert list(again.outputs[0].token_ids) == hf_greedy(checkpoint, prompt, NEW_TOKENS)[0]
