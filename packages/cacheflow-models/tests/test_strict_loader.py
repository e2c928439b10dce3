"""StrictLoader's name matching on whole name parts and fused tensors loaded whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cacheflow_models.loading import StrictLoader, WeightLoadError, replace_name_part
from cacheflow_runtime.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

STACKED = {
    ".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(8, 2, 4, 2, bias=False)  # q 8 rows, k 4, v 4
        self.gate_up_proj = MergedColumnParallelLinear(8, [6, 6], bias=False)


def _model() -> nn.Module:
    model = nn.Module()
    model.layer = Block()
    return model


def test_fragments_match_whole_name_parts() -> None:
    assert replace_name_part("m.attn.q_proj.weight", ".q_proj.", ".qkv_proj.") == \
        "m.attn.qkv_proj.weight"
    assert replace_name_part("m.attn.qkv_proj.weight", ".q_proj.", ".qkv_proj.") is None
    assert replace_name_part("m.attn.qkv_proj.weight", "v_proj", "x") is None
    assert replace_name_part("m.mlp.gate_up_proj.weight", ".up_proj.", ".x.") is None
    assert replace_name_part("q_proj.weight", "q_proj", "qkv_proj") == "qkv_proj.weight"
    with pytest.raises(ValueError, match="empty name fragment"):
        replace_name_part("a.b", "..", "x")


def test_fused_qkv_and_gate_up_load_whole_with_the_split_names_in_the_map() -> None:
    """A Phi-3 style checkpoint (qkv_proj and gate_up_proj already fused) through a loader whose
    map also fuses q/k/v and gate/up: the fused names match no fragment and load whole."""
    g = torch.Generator().manual_seed(0)
    qkv, gate_up = torch.randn(16, 8, generator=g), torch.randn(12, 8, generator=g)
    fused = _model()
    loader = StrictLoader(fused, STACKED)
    loader.load([("layer.qkv_proj.weight", qkv), ("layer.gate_up_proj.weight", gate_up)])
    split = _model()
    StrictLoader(split, STACKED).load([
        ("layer.q_proj.weight", qkv[:8]), ("layer.k_proj.weight", qkv[8:12]),
        ("layer.v_proj.weight", qkv[12:]), ("layer.gate_proj.weight", gate_up[:6]),
        ("layer.up_proj.weight", gate_up[6:])])
    for (name, a), (_, b) in zip(fused.named_parameters(), split.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(fused.layer.qkv_proj.weight, qkv)


def test_a_missing_part_is_named_once() -> None:
    loader = StrictLoader(_model(), STACKED)
    for name, rows in (("q_proj", 8), ("k_proj", 4), ("gate_proj", 6), ("up_proj", 6)):
        loader.load_one(f"layer.{name}.weight", torch.zeros(rows, 8))
    with pytest.raises(WeightLoadError, match=r"parameters not found in the checkpoint: "
                                              r"\['layer.qkv_proj.weight'\] \(missing "
                                              r"checkpoint tensors \['layer.v_proj.weight'\]\)"):
        loader.finish()
