"""Qwen3, Gemma 2, Gemma 3 and Phi-3 on CPU in float32: HF transformers' greedy tokens with
logprobs within 1e-4 on a batch of prompts of different lengths, for several shapes each (GQA,
MQA, tied and untied heads, sliding windows shorter than the prompts, soft-capping, partial
rotary, longrope prompts on both sides of its switch length and sequences crossing it);
tensor-parallel shards that put together give the whole tensors at 2 and 4 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_models import build_model_config
from cacheflow_models.checks.outputs import hf_greedy, load_hf_model
from cacheflow_models.testing import (
    assert_tp_shards_roundtrip,
    check_greedy_fidelity,
    run_engine,
    save_tiny_checkpoint,
)
from cacheflow_runtime import SamplingParams

from dense_testutil import PHI3_LONGROPE, VARIANTS, variant_config

NEW_TOKENS = 32
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


LONGROPE_VARIANTS = ("phi3_longrope", "phi3_su_partial_mqa")


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - set(LONGROPE_VARIANTS)))
def test_matches_hf(variant: str, tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / variant, variant_config(variant))
    assert build_model_config(path).architecture == ARCHITECTURES[variant.split("_")[0]]
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


def _longrope_prompts(prompt_batch: list[list[int]], new_tokens: int,
                      crossing: bool) -> list[list[int]]:
    """Test prompts that cross the original length while generating ``new_tokens`` (or those
    that do not: short throughout, or long from their prefill)."""
    original = PHI3_LONGROPE["original_max_position_embeddings"]
    chosen = [p for p in prompt_batch
              if (len(p) <= original < len(p) + new_tokens) == crossing]
    assert len(chosen) >= 2
    return chosen


@pytest.mark.parametrize("variant", LONGROPE_VARIANTS)
def test_longrope_matches_hf_generate(variant: str, tmp_path: Path,
                                      prompt_batch: list[list[int]]) -> None:
    # Prompts short of the original length throughout and prompts past it from their prefill
    # (HF generate recomputes the whole cache when a sequence crosses the original length; see
    # the next test).
    path = save_tiny_checkpoint(tmp_path / variant, variant_config(variant))
    assert build_model_config(path).architecture == "Phi3ForCausalLM"
    prompts = _longrope_prompts(prompt_batch, 8, crossing=False)
    original = PHI3_LONGROPE["original_max_position_embeddings"]
    assert any(len(p) > original for p in prompts) and any(len(p) < original for p in prompts)
    check_greedy_fidelity(path, prompts, 8)


@pytest.mark.parametrize("variant", LONGROPE_VARIANTS)
def test_longrope_switch_during_generation_matches_hf_cached_forward(
        variant: str, tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    """Sequences that cross the original length while generating: each new token is rotated
    with the factors of its sequence's length at that step and cached keys keep theirs, which is
    what HF's model computes step by step with its KV cache (the check tool's reference). HF's
    Phi3 ``generate`` instead drops its cache at the crossing and recomputes the sequence with
    the long factors; the engine does not recompute sequences (see the port's docstring)."""
    path = save_tiny_checkpoint(tmp_path / variant, variant_config(variant))
    prompts = _longrope_prompts(prompt_batch, NEW_TOKENS, crossing=True)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = run_engine(path, prompts, params)
    model = load_hf_model(str(path), torch.float32, "cpu")
    for prompt, out in zip(prompts, outputs):
        ref = hf_greedy(model, prompt, NEW_TOKENS)
        completion = out.outputs[0]
        assert completion.token_ids == ref.tokens
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref.logprobs)) < 1e-4


@pytest.mark.parametrize("variant", ["qwen3_gqa_tied", "qwen3_mqa_untied_head_dim32",
                                     "gemma2_mqa_untied_scalar", "gemma3_gqa_tied",
                                     "phi3_gqa", "phi3_su_partial_mqa"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_shards_roundtrip(variant: str, world_size: int, tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / variant, variant_config(variant))
    checked = assert_tp_shards_roundtrip(path, world_size)
    assert checked > 10
