"""GPT-NeoX on CPU in float32: greedy tokens identical to HF transformers, logprobs within 1e-4,
for partial rotary with parallel residual and full rotary with sequential residual; strict
weight loading; tensor-parallel shards that reassemble into the whole weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_models.loading import WeightLoadError
from cacheflow_models.models.gpt_neox import neox_qkv_to_stacked
from cacheflow_models.testing import (
    GPT_NEOX_VARIANTS,
    assert_same_parameters,
    assert_tp_shards_roundtrip,
    check_greedy_fidelity,
    checkpoint_tensors,
    load_tiny_model,
    load_with_weights,
    save_tiny_checkpoint,
    tiny_gpt_neox_config,
)

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("neox"), tiny_gpt_neox_config())


@pytest.mark.parametrize("variant", sorted(GPT_NEOX_VARIANTS))
def test_greedy_matches_hf(variant: str, tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    config = tiny_gpt_neox_config(**GPT_NEOX_VARIANTS[variant])
    check_greedy_fidelity(save_tiny_checkpoint(tmp_path / variant, config), prompt_batch,
                          NEW_TOKENS)


def test_fused_qkv_reorder() -> None:
    heads, head_size, hidden = 3, 2, 5
    # Row (h, part, i) of HF's per-head layout holds the value 100 * part + 10 * h + i.
    rows = torch.tensor([100 * p + 10 * h + i for h in range(heads) for p in range(3)
                         for i in range(head_size)], dtype=torch.float32)
    stacked = neox_qkv_to_stacked(rows[:, None].expand(-1, hidden), heads)
    expected = torch.tensor([100 * p + 10 * h + i for p in range(3) for h in range(heads)
                             for i in range(head_size)], dtype=torch.float32)
    assert torch.equal(stacked[:, 0], expected)
    assert torch.equal(neox_qkv_to_stacked(rows, heads), expected)


def test_lm_head_name_and_old_buffers(tiny: Path) -> None:
    # transformers 5 names the head lm_head in memory; older checkpoints carry mask and rotary
    # buffers that no parameter takes.
    weights = [(name.replace("embed_out.", "lm_head."), t) for name, t in checkpoint_tensors(tiny)]
    for i in range(tiny_gpt_neox_config().num_hidden_layers):
        prefix = f"gpt_neox.layers.{i}.attention"
        weights += [(f"{prefix}.bias", torch.ones(1, 1, 128, 128).tril()),
                    (f"{prefix}.masked_bias", torch.tensor(-1e9)),
                    (f"{prefix}.rotary_emb.inv_freq", torch.ones(2))]
    assert_same_parameters(load_with_weights(tiny, weights), load_tiny_model(tiny))


def test_strict_loading_names_the_problem(tiny: Path) -> None:
    weights = checkpoint_tensors(tiny)
    with pytest.raises(WeightLoadError, match=r"embed_out\.weight"):
        load_with_weights(tiny, [(n, t) for n, t in weights if n != "embed_out.weight"])
    with pytest.raises(WeightLoadError, match=r"gpt_neox\.extra"):
        load_with_weights(tiny, weights + [("gpt_neox.extra", torch.zeros(2))])
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    bad = [(n, t[:-1] if n == name else t) for n, t in weights]
    with pytest.raises(WeightLoadError, match=name.replace(".", r"\.")):
        load_with_weights(tiny, bad)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_shards_roundtrip(tiny: Path, world_size: int) -> None:
    assert assert_tp_shards_roundtrip(tiny, world_size) > 0
