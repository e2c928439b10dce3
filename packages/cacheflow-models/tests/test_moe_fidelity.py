"""Mixture-of-experts models on CPU in float32: Mixtral (top-1/2/3, GQA/MQA, tied, sliding
window) and Qwen2-MoE (shared expert or none, norm_topk_prob, dense layers, sparse step, windows,
gelu in every MLP) give HF transformers' greedy tokens with logprobs within 1e-4 on a batch of
prompts; their experts shard over 2 and 4 tensor-parallel ranks; strict loading names missing,
extra and misshapen expert tensors, and takes or refuses a Qwen2-MoE checkpoint's shared-expert
tensors when the config has no shared expert."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cacheflow_models import build_model_config
from cacheflow_models.loading import WeightLoadError
from cacheflow_models.testing import (
    MIXTRAL_VARIANTS,
    QWEN2_MOE_VARIANTS,
    assert_same_parameters,
    assert_tp_shards_roundtrip,
    check_greedy_fidelity,
    checkpoint_tensors,
    load_with_weights,
    save_tiny_checkpoint,
    tiny_mixtral_config,
    tiny_qwen2_moe_config,
)

NEW_TOKENS = 24
MODELS: dict[str, tuple[Callable[..., Any], dict[str, dict[str, Any]]]] = {
    "MixtralForCausalLM": (tiny_mixtral_config, MIXTRAL_VARIANTS),
    "Qwen2MoeForCausalLM": (tiny_qwen2_moe_config, QWEN2_MOE_VARIANTS),
}
CASES = [(arch, variant) for arch, (_, variants) in MODELS.items() for variant in variants]


def _checkpoint(tmp_path: Path, arch: str, variant: str) -> Path:
    builder, variants = MODELS[arch]
    return save_tiny_checkpoint(tmp_path / variant, builder(**variants[variant]))


@pytest.mark.parametrize("arch, variant", CASES)
def test_greedy_matches_hf(arch: str, variant: str, tmp_path: Path,
                           prompt_batch: list[list[int]]) -> None:
    path = _checkpoint(tmp_path, arch, variant)
    assert build_model_config(path).architecture == arch
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("arch, variant, params", [
    # embedding, final norm, head + 2 layers of (2 norms, qkv, o, router, w13, w2)
    ("MixtralForCausalLM", "gqa_top2", 3 + 2 * 7),
    # + layer 0 dense (2 norms, qkv weight and bias, o, gate_up, down), layers 1-2 sparse
    # (2 norms, qkv weight and bias, o, router, w13, w2, shared gate_up, down and gate)
    ("Qwen2MoeForCausalLM", "dense_layer_top1", 3 + 7 + 2 * 11),
])
def test_tp_shards_roundtrip(arch: str, variant: str, params: int, world_size: int,
                             tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, arch, variant)
    assert assert_tp_shards_roundtrip(path, world_size) == params


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("mixtral"), tiny_mixtral_config())
    return path, checkpoint_tensors(path)


def test_missing_expert_tensor_is_named(mixtral: tuple[Path, list]) -> None:
    path, tensors = mixtral
    gone = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    with pytest.raises(WeightLoadError) as exc:
        load_with_weights(path, [(n, t) for n, t in tensors if n != gone])
    message = str(exc.value)
    assert "parameters not found in the checkpoint: ['model.layers.1.mlp.experts.w13_weight']" \
        in message
    assert f"missing checkpoint tensors ['{gone}']" in message


def test_extra_expert_tensor_is_named(mixtral: tuple[Path, list]) -> None:
    path, tensors = mixtral
    extra = ("model.layers.0.block_sparse_moe.experts.0.w4.weight", torch.zeros(96, 64))
    with pytest.raises(WeightLoadError, match="tensors in the checkpoint that no parameter "
                                              r"takes: \['model.layers.0.block_sparse_moe."
                                              r"experts.0.w4.weight'\]"):
        load_with_weights(path, tensors + [extra])


def test_expert_out_of_range_is_refused(mixtral: tuple[Path, list]) -> None:
    path, tensors = mixtral
    extra = ("model.layers.0.block_sparse_moe.experts.4.w1.weight", torch.zeros(96, 64))
    with pytest.raises(WeightLoadError, match="no parameter takes: .*experts.4.w1.weight"):
        load_with_weights(path, tensors + [extra])


def test_misshapen_expert_tensor_is_named(mixtral: tuple[Path, list]) -> None:
    path, tensors = mixtral
    bad = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    swapped = [(n, t[:, :-1] if n == bad else t) for n, t in tensors]
    with pytest.raises(WeightLoadError, match=f"checkpoint tensor '{bad}': down projection of "
                                              r"expert 1: checkpoint shape \(64, 95\) is not "
                                              r"\(64, 96\)"):
        load_with_weights(path, swapped)


def test_fused_transformers5_names_load_like_per_expert_ones(mixtral: tuple[Path, list]) -> None:
    path, tensors = mixtral
    by_name = dict(tensors)
    fused: list[tuple[str, torch.Tensor]] = []
    for name, tensor in tensors:
        if ".experts." not in name:
            fused.append((name.replace("block_sparse_moe", "mlp"), tensor))
    for layer in range(2):
        stem = f"model.layers.{layer}.block_sparse_moe.experts"
        gate_up = torch.stack([torch.cat([by_name[f"{stem}.{e}.w1.weight"],
                                          by_name[f"{stem}.{e}.w3.weight"]]) for e in range(4)])
        down = torch.stack([by_name[f"{stem}.{e}.w2.weight"] for e in range(4)])
        fused += [(f"model.layers.{layer}.mlp.experts.gate_up_proj", gate_up),
                  (f"model.layers.{layer}.mlp.experts.down_proj", down)]
    a, b = load_with_weights(path, tensors), load_with_weights(path, fused)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


@pytest.fixture(scope="module")
def qwen2_moe_no_shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("no_shared"),
                                tiny_qwen2_moe_config(shared_expert_intermediate_size=0))
    return path, checkpoint_tensors(path)


def test_no_shared_expert_loads_without_the_zero_width_tensors(
        qwen2_moe_no_shared: tuple[Path, list]) -> None:
    path, tensors = qwen2_moe_no_shared
    shared = [n for n, _ in tensors if ".shared_expert" in n]
    # HF's checkpoint holds the zero-width shared expert and its gate in both layers.
    assert len(shared) == 8
    kept = [(n, t) for n, t in tensors if n not in shared]
    assert_same_parameters(load_with_weights(path, tensors), load_with_weights(path, kept))


def test_no_shared_expert_refuses_a_shared_expert_with_weights(
        qwen2_moe_no_shared: tuple[Path, list]) -> None:
    path, tensors = qwen2_moe_no_shared
    bad = "model.layers.1.mlp.shared_expert.up_proj.weight"
    widened = [(n, torch.zeros(80, 64) if n == bad else t) for n, t in tensors]
    with pytest.raises(WeightLoadError, match=r"tensors in the checkpoint that no parameter "
                                              rf"takes: \['{bad}'\]"):
        load_with_weights(path, widened)
