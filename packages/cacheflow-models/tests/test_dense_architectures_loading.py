"""Strict weight accounting of Qwen3, Gemma 2, Gemma 3 and Phi-3: a checkpoint without one of
the model's tensors, with one too many, or with a misshapen fused tensor fails to load with a
WeightLoadError naming the tensor; configs the ports cannot serve are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_models.loading import WeightLoadError
from cacheflow_models.testing import (
    checkpoint_tensors,
    load_tiny_model,
    load_with_weights,
    save_tiny_checkpoint,
)

from dense_testutil import tiny_gemma3_config, variant_config

# Per architecture: a tensor only that architecture has (the one removed), and the parameter
# that then stays unloaded.
MISSING = {
    "qwen3_gqa_tied": ("model.layers.1.self_attn.k_norm.weight",
                       "model.layers.1.self_attn.k_norm.weight"),
    "gemma2_gqa_tied": ("model.layers.0.post_feedforward_layernorm.weight",
                        "model.layers.0.post_feedforward_layernorm.weight"),
    "gemma3_gqa_tied": ("model.layers.2.self_attn.q_norm.weight",
                        "model.layers.2.self_attn.q_norm.weight"),
    "phi3_gqa": ("model.layers.1.mlp.gate_up_proj.weight",
                 "model.layers.1.mlp.gate_up_proj.weight"),
}


@pytest.fixture(scope="module", params=sorted(MISSING))
def checkpoint(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    variant = request.param
    return variant, save_tiny_checkpoint(tmp_path_factory.mktemp(variant),
                                         variant_config(variant))


def test_checkpoint_loads_whole(checkpoint: tuple[str, Path]) -> None:
    variant, path = checkpoint
    model = load_tiny_model(path)
    tensors = dict(checkpoint_tensors(path))
    params = dict(model.named_parameters())
    removed, _ = MISSING[variant]
    assert torch.equal(params[removed], tensors[removed])


def test_missing_tensor_is_named(checkpoint: tuple[str, Path]) -> None:
    variant, path = checkpoint
    removed, parameter = MISSING[variant]
    weights = [(n, t) for n, t in checkpoint_tensors(path) if n != removed]
    with pytest.raises(WeightLoadError, match="parameters not found in the checkpoint") as info:
        load_with_weights(path, weights)
    assert f"'{parameter}'" in str(info.value)


def test_unexpected_tensor_is_named(checkpoint: tuple[str, Path]) -> None:
    _, path = checkpoint
    extra = "model.layers.0.self_attn.extra_norm.weight"
    weights = checkpoint_tensors(path) + [(extra, torch.zeros(16))]
    with pytest.raises(WeightLoadError, match="no parameter takes") as info:
        load_with_weights(path, weights)
    assert f"'{extra}'" in str(info.value)


def test_phi3_misshapen_fused_qkv_is_named(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path, variant_config("phi3_gqa"))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    weights = [(n, t[:-16] if n == name else t) for n, t in checkpoint_tensors(path)]
    with pytest.raises(WeightLoadError, match="fused qkv") as info:
        load_with_weights(path, weights)
    assert f"'{name}'" in str(info.value)


def test_phi3_split_checkpoint_names_are_unexpected(tmp_path: Path) -> None:
    # Phi-3 checkpoints hold the fused tensors; separate q/k/v tensors are not taken.
    path = save_tiny_checkpoint(tmp_path, variant_config("phi3_gqa"))
    weights = []
    for name, tensor in checkpoint_tensors(path):
        if name.endswith("self_attn.qkv_proj.weight"):
            for part, rows in zip("qkv", tensor.split([64, 32, 32])):
                weights.append((name.replace("qkv_proj", f"{part}_proj"), rows))
        else:
            weights.append((name, tensor))
    with pytest.raises(WeightLoadError) as info:
        load_with_weights(path, weights)
    assert "'model.layers.0.self_attn.q_proj.weight'" in str(info.value)
    assert "'model.layers.0.self_attn.qkv_proj.weight'" in str(info.value)


def test_gemma3_bidirectional_config_is_refused(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path, tiny_gemma3_config())
    config = path / "config.json"
    text = config.read_text()
    assert '"use_bidirectional_attention": false' in text
    config.write_text(text.replace('"use_bidirectional_attention": false',
                                   '"use_bidirectional_attention": true'))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        load_tiny_model(path)
