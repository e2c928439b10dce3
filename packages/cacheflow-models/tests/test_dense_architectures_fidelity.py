"""Qwen3, Gemma 2, Gemma 3 and Phi-3 on CPU in float32: HF transformers' greedy tokens with
logprobs within 1e-4 on a batch of prompts of different lengths, for several shapes each (GQA,
MQA, tied and untied heads, sliding windows shorter than the prompts, soft-capping, partial
rotary, longrope crossing its switch length); tensor-parallel shards that put together give the
whole tensors at 2 and 4 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
from dense_testutil import PHI3_LONGROPE, VARIANTS, variant_config

from cacheflow_models import build_model_config
from cacheflow_models.testing import save_tiny_checkpoint

from models_testutil import assert_tp_shards_roundtrip, check_greedy_fidelity

NEW_TOKENS = 32
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_hf(variant: str, tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / variant, variant_config(variant))
    assert build_model_config(path).architecture == ARCHITECTURES[variant.split("_")[0]]
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


def test_phi3_longrope_prompts_cross_the_switch(prompt_batch: list[list[int]]) -> None:
    # What test_matches_hf[phi3_longrope] relies on: one prompt already past the original length
    # at prefill, the others crossing it while generating, all within the stretched length.
    original = PHI3_LONGROPE["original_max_position_embeddings"]
    assert max(len(p) for p in prompt_batch) > original
    assert all(len(p) + NEW_TOKENS > original for p in prompt_batch)
    assert any(len(p) <= original for p in prompt_batch)
    assert max(len(p) for p in prompt_batch) + NEW_TOKENS <= PHI3_LONGROPE[
        "max_position_embeddings"]


@pytest.mark.parametrize("variant", ["qwen3_gqa_tied", "qwen3_mqa_untied_head_dim32",
                                     "gemma2_mqa_untied_scalar", "gemma3_gqa_tied",
                                     "phi3_gqa", "phi3_su_partial_mqa"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_shards_roundtrip(variant: str, world_size: int, tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / variant, variant_config(variant))
    checked = assert_tp_shards_roundtrip(path, world_size)
    assert checked > 10
