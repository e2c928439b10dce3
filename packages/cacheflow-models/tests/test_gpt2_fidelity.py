"""GPT-2 on CPU in float32: greedy tokens identical to HF transformers, logprobs within 1e-4;
strict weight loading; tensor-parallel shards that reassemble into the whole weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_models.loading import WeightLoadError
from cacheflow_models.testing import (
    GPT2_VARIANTS,
    assert_same_parameters,
    assert_tp_shards_roundtrip,
    check_greedy_fidelity,
    checkpoint_tensors,
    load_tiny_model,
    load_with_weights,
    save_tiny_checkpoint,
    tiny_gpt2_config,
)

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gpt2"), tiny_gpt2_config())


@pytest.mark.parametrize("variant", sorted(GPT2_VARIANTS))
def test_greedy_matches_hf(variant: str, tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    config = tiny_gpt2_config(**GPT2_VARIANTS[variant])
    check_greedy_fidelity(save_tiny_checkpoint(tmp_path / variant, config), prompt_batch,
                          NEW_TOKENS)


def test_checkpoint_without_prefix_and_with_mask_buffers(tiny: Path) -> None:
    # The layout of the original OpenAI conversions: GPT2Model names plus causal-mask buffers.
    weights = [(name.removeprefix("transformer."), t) for name, t in checkpoint_tensors(tiny)]
    for i in range(tiny_gpt2_config().n_layer):
        weights.append((f"h.{i}.attn.bias", torch.ones(1, 1, 128, 128).tril()))
        weights.append((f"h.{i}.attn.masked_bias", torch.tensor(-1e4)))
    assert_same_parameters(load_with_weights(tiny, weights), load_tiny_model(tiny))


def test_strict_loading_names_the_problem(tiny: Path) -> None:
    weights = checkpoint_tensors(tiny)
    dropped = [(n, t) for n, t in weights if n != "transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(WeightLoadError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_with_weights(tiny, dropped)
    with pytest.raises(WeightLoadError, match=r"transformer\.h\.0\.attn\.extra"):
        load_with_weights(tiny, weights + [("transformer.h.0.attn.extra", torch.zeros(2))])
    bad = [(n, t[:, :-1] if n.endswith("h.0.mlp.c_fc.weight") else t) for n, t in weights]
    with pytest.raises(WeightLoadError, match=r"h\.0\.mlp\.c_fc\.weight"):
        load_with_weights(tiny, bad)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_shards_roundtrip(tiny: Path, world_size: int) -> None:
    assert assert_tp_shards_roundtrip(tiny, world_size) > 0
