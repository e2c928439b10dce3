"""The mixture-of-experts layer on CPU: router normalisations, the expert-sorted grouped
computation against a plain per-expert loop, shard-aware weight loading and its errors, and
tensor-parallel partial sums that add up to the full layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.layers.activation import SiluAndMul
from cacheflow_runtime.layers.fused_moe import (
    FusedMoE,
    fused_experts,
    per_expert_reference,
    select_experts,
    sort_by_expert,
)

E, H, INTER, T = 5, 16, 24, 11


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expert_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {f"{e}.{part}": torch.randn(shape, generator=g)
            for e in range(E)
            for part, shape in (("gate", (INTER, H)), ("up", (INTER, H)), ("down", (H, INTER)))}


def _load(layer: FusedMoE, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        e, part = key.split(".")
        param = layer.w2_weight if part == "down" else layer.w13_weight
        layer.weight_loader(param, tensor, (int(e), part))


def test_select_experts_normalisations() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 5.0, 4.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2], [2, 3]]
    assert torch.allclose(w, probs.gather(1, ids))
    w, ids = select_experts(logits, 2, renormalize=True)
    # Mixtral: a softmax over the top-k logits.
    assert torch.allclose(w, torch.softmax(logits.gather(1, ids), -1))
    assert torch.allclose(w.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="top_k must be in \\[1, 4\\]"):
        select_experts(logits, 5, renormalize=True)


def test_sort_by_expert_segments() -> None:
    ids = torch.tensor([[2, 0], [2, 4], [0, 2]])
    order, offsets = sort_by_expert(ids, 5)
    flat = ids.reshape(-1)
    assert flat[order].tolist() == [0, 0, 2, 2, 2, 4]
    assert order.tolist() == [1, 4, 0, 2, 5, 3]  # stable: token order kept within an expert
    assert offsets.tolist() == [0, 2, 2, 5, 5, 6]


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_grouped_computation_matches_per_expert_loop(top_k: int) -> None:
    g = _gen(1)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * INTER, H, generator=g)
    w2 = torch.randn(E, H, INTER, generator=g)
    weights, ids = select_experts(torch.randn(T, E, generator=g), top_k, True)
    ours = fused_experts(x, w13, w2, weights, ids, SiluAndMul())
    ref = per_expert_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    # And against the definition, token by token.
    for t in range(T):
        want = sum(weights[t, j] * (F.linear(F.silu(F.linear(x[t], w13[e, :INTER]))
                                             * F.linear(x[t], w13[e, INTER:]), w2[e]))
                   for j, e in enumerate(ids[t].tolist()))
        torch.testing.assert_close(ours[t], want, rtol=1e-5, atol=1e-4)


def test_loaded_layer_computes_the_experts() -> None:
    tensors = _expert_tensors()
    layer = FusedMoE(E, 2, H, INTER)
    _load(layer, tensors)
    assert torch.equal(layer.w13_weight[3, :INTER], tensors["3.gate"])
    assert torch.equal(layer.w13_weight[3, INTER:], tensors["3.up"])
    assert torch.equal(layer.w2_weight[3], tensors["3.down"])
    g = _gen(2)
    x, logits = torch.randn(T, H, generator=g), torch.randn(T, E, generator=g)
    weights, ids = select_experts(logits, 2, True)
    ref = per_expert_reference(x, layer.w13_weight, layer.w2_weight, weights, ids)
    torch.testing.assert_close(layer(x, logits), ref, rtol=1e-5, atol=1e-4)


def test_fused_and_stacked_tensors_load_whole() -> None:
    tensors = _expert_tensors()
    per_expert = FusedMoE(E, 2, H, INTER)
    _load(per_expert, tensors)
    gate = torch.stack([tensors[f"{e}.gate"] for e in range(E)])
    up = torch.stack([tensors[f"{e}.up"] for e in range(E)])
    down = torch.stack([tensors[f"{e}.down"] for e in range(E)])
    fused = FusedMoE(E, 2, H, INTER)  # transformers 5 names: gate_up_proj, down_proj
    fused.weight_loader(fused.w13_weight, torch.cat([gate, up], dim=1), None)
    fused.weight_loader(fused.w2_weight, down, None)
    stacked = FusedMoE(E, 2, H, INTER)  # GGUF: ffn_gate_exps, ffn_up_exps, ffn_down_exps
    for part, tensor in (("gate", gate), ("up", up), ("down", down)):
        param = stacked.w2_weight if part == "down" else stacked.w13_weight
        stacked.weight_loader(param, tensor, (None, part))
    for other in (fused, stacked):
        assert torch.equal(other.w13_weight, per_expert.w13_weight)
        assert torch.equal(other.w2_weight, per_expert.w2_weight)


def test_loader_errors_name_the_problem() -> None:
    layer = FusedMoE(E, 2, H, INTER)
    with pytest.raises(ValueError, match=r"gate projection of expert 1: checkpoint shape "
                                         r"\(24, 15\) is not \(24, 16\)"):
        layer.weight_loader(layer.w13_weight, torch.zeros(INTER, H - 1), (1, "gate"))
    with pytest.raises(ValueError, match="expert 5 is out of range for 5 experts"):
        layer.weight_loader(layer.w13_weight, torch.zeros(INTER, H), (5, "up"))
    with pytest.raises(ValueError, match="does not fit this parameter"):
        layer.weight_loader(layer.w13_weight, torch.zeros(H, INTER), (0, "down"))
    with pytest.raises(ValueError, match=r"is not \[num_experts, 2 \* 24, hidden\]"):
        layer.weight_loader(layer.w13_weight, torch.zeros(E, INTER, H), None)
    with pytest.raises(ValueError, match="expert activation 'relu' is not supported"):
        FusedMoE(E, 2, H, INTER, activation="relu")
    with pytest.raises(ValueError, match="expert intermediate size \\(24\\) is not divisible"):
        with ps.tensor_parallel_shard(5, 0):
            FusedMoE(E, 2, H, INTER)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_partial_sums_add_up(world: int) -> None:
    tensors = _expert_tensors(3)
    full = FusedMoE(E, 2, H, INTER)
    _load(full, tensors)
    g = _gen(4)
    x, logits = torch.randn(T, H, generator=g), torch.randn(T, E, generator=g)
    total = torch.zeros(T, H)
    local = INTER // world
    for rank in range(world):
        with ps.tensor_parallel_shard(world, rank):
            part = FusedMoE(E, 2, H, INTER, reduce_results=False)
            _load(part, tensors)
        rows = slice(rank * local, (rank + 1) * local)
        assert torch.equal(part.w13_weight[:, :local], full.w13_weight[:, :INTER][:, rows])
        assert torch.equal(part.w13_weight[:, local:], full.w13_weight[:, INTER:][:, rows])
        assert torch.equal(part.w2_weight, full.w2_weight[:, :, rows])
        total += part(x, logits)  # what the all-reduce sums
    torch.testing.assert_close(total, full(x, logits), rtol=1e-5, atol=1e-4)


def test_checkpoint_names_map_per_expert_and_fused_names() -> None:
    names = FusedMoE.checkpoint_names("experts", 2, gate="w1", up="w3", down="w2")
    assert names[".experts.1.w3.weight"] == (".experts.w13_weight", (1, "up"))
    assert names[".experts.0.w2.weight"] == (".experts.w2_weight", (0, "down"))
    assert names[".experts.gate_up_proj"] == (".experts.w13_weight", None)
    assert len(names) == 2 * 3 + 2


def test_cuda_fallback_masking_matches_segments_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The masked, sync-free formulation used on CUDA without the kernel, run on CPU tensors."""
    from cacheflow_runtime.layers import fused_moe

    g = _gen(5)
    x, w = torch.randn(9, H, generator=g), torch.randn(E, 7, H, generator=g)
    offsets = torch.tensor([0, 2, 2, 6, 9, 9])
    segments = fused_moe.grouped_linear(x, w, offsets)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(fused_moe, "kernels_for", lambda *t: None)
    masked = fused_moe.grouped_linear(x, w, offsets)
    torch.testing.assert_close(masked, segments, rtol=1e-5, atol=1e-5)
    assert torch.allclose(masked[2:6], x[2:6] @ w[2].t(), atol=1e-5)
