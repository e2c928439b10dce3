"""OPT on CPU in float32: greedy tokens identical to HF transformers, logprobs within 1e-4, for
pre-LN, post-LN (350m) and project_in/out models; strict weight loading; tensor-parallel shards
that reassemble into the whole weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_models.loading import WeightLoadError
from cacheflow_models.testing import (
    OPT_VARIANTS,
    assert_same_parameters,
    assert_tp_shards_roundtrip,
    check_greedy_fidelity,
    checkpoint_tensors,
    load_tiny_model,
    load_with_weights,
    save_tiny_checkpoint,
    tiny_opt_config,
)

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_opt_config(**OPT_VARIANTS["project_in_out"])
    return save_tiny_checkpoint(tmp_path_factory.mktemp("opt"), config)


@pytest.mark.parametrize("variant", sorted(OPT_VARIANTS))
def test_greedy_matches_hf(variant: str, tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    config = tiny_opt_config(**OPT_VARIANTS[variant])
    check_greedy_fidelity(save_tiny_checkpoint(tmp_path / variant, config), prompt_batch,
                          NEW_TOKENS)


def test_model_structure_follows_config() -> None:
    from cacheflow_models.models.opt import OPTForCausalLM

    post = OPTForCausalLM(tiny_opt_config(do_layer_norm_before=False))
    assert post.model.decoder.final_layer_norm is None
    removed = OPTForCausalLM(tiny_opt_config(_remove_final_layer_norm=True))
    assert removed.model.decoder.final_layer_norm is None
    plain = OPTForCausalLM(tiny_opt_config())
    assert plain.model.decoder.final_layer_norm is not None
    assert plain.model.decoder.project_in is None


def test_metaseq_names_without_model_prefix(tiny: Path) -> None:
    weights = [(name.removeprefix("model."), t) for name, t in checkpoint_tensors(tiny)]
    assert_same_parameters(load_with_weights(tiny, weights), load_tiny_model(tiny))


def test_strict_loading_names_the_problem(tiny: Path) -> None:
    weights = checkpoint_tensors(tiny)
    missing = "model.decoder.layers.1.self_attn.k_proj.weight"
    with pytest.raises(WeightLoadError, match=r"layers\.1\.self_attn\.qkv_proj\.weight"):
        load_with_weights(tiny, [(n, t) for n, t in weights if n != missing])
    with pytest.raises(WeightLoadError, match=r"model\.decoder\.extra"):
        load_with_weights(tiny, weights + [("model.decoder.extra", torch.zeros(2))])
    bad = [(n, t[:-1] if n.endswith("project_out.weight") else t) for n, t in weights]
    with pytest.raises(WeightLoadError, match=r"project_out\.weight"):
        load_with_weights(tiny, bad)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_shards_roundtrip(tiny: Path, world_size: int) -> None:
    assert assert_tp_shards_roundtrip(tiny, world_size) > 0
