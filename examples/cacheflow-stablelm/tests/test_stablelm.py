"""cacheflow-stablelm against HF transformers, with the helpers installed with cacheflow-models
(``cacheflow_models.testing``) only: greedy tokens and logprobs, tensor-parallel shards, strict
loading, and the GGUF model-type registration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import StableLmConfig

from cacheflow_models import build_model_config
from cacheflow_models.loading import WeightLoadError
from cacheflow_models.testing import (
    BYTE_VOCAB_SIZE,
    assert_tp_shards_roundtrip,
    check_greedy_fidelity,
    checkpoint_tensors,
    load_with_weights,
    prompt_batch,
    save_tiny_checkpoint,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "parallel_qkv_bias": dict(use_parallel_residual=True, use_qkv_bias=True),
    "sequential_gqa_tied": dict(num_key_value_heads=2, partial_rotary_factor=0.5,
                                tie_word_embeddings=True),
    "mqa_full_rotary": dict(num_key_value_heads=1, partial_rotary_factor=1.0),
}


def tiny_stablelm_config(**overrides: Any) -> StableLmConfig:
    """A 2-layer StableLM config of width 64 over the byte vocabulary of the test helpers."""
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        partial_rotary_factor=0.25, use_qkv_bias=False, use_parallel_residual=False,
        layer_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    settings.update(overrides)
    return StableLmConfig(**settings)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_hf(variant: str, tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / variant, tiny_stablelm_config(**VARIANTS[variant]))
    assert build_model_config(path).architecture == "StableLmForCausalLM"
    check_greedy_fidelity(path, prompt_batch(lengths=(1, 17, 40)), 16)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_shards_roundtrip(world_size: int, tmp_path: Path) -> None:
    config = tiny_stablelm_config(**VARIANTS["parallel_qkv_bias"])
    path = save_tiny_checkpoint(tmp_path / "tp", config)
    # embedding, final norm (weight, bias), head + per layer: input norm (2), qkv (2), o, gate_up,
    # down (parallel residual: no second norm)
    assert assert_tp_shards_roundtrip(path, world_size) == 4 + 2 * 7


def test_missing_and_extra_tensors_are_named(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "strict", tiny_stablelm_config())
    tensors = checkpoint_tensors(path)
    gone = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(WeightLoadError, match=r"missing checkpoint tensors \['" + gone):
        load_with_weights(path, [(n, t) for n, t in tensors if n != gone])
    with pytest.raises(WeightLoadError, match="no parameter takes: .*'model.layers.0.extra'"):
        load_with_weights(path, tensors + [("model.layers.0.extra", torch.zeros(2))])


def test_gguf_model_type_resolves_to_the_plugin() -> None:
    from transformers import PretrainedConfig

    from cacheflow_models.registry import gguf_model_types, resolve_architecture

    assert gguf_model_types()["stablelm"] == "StableLmForCausalLM"
    # A GGUF file's config names only its model type.
    assert resolve_architecture(PretrainedConfig(model_type="stablelm")) == "StableLmForCausalLM"
