"""The mixture-of-experts layer on CPU: router normalisations, the expert-sorted grouped
computation against a plain per-expert loop, shard-aware weight loading and its errors, and
tensor-parallel partial sums that add up to the full layer."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

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


# ---- the fused CUDA path's wiring, on CPU tensors with torch stand-ins for the kernels ----------


class _TorchKernels:
    """The four MoE kernels of cacheflow-kernels as torch code (their documented semantics),
    so that the fused path's calls run on the CPU."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def moe_sort_by_expert(self, offsets: Tensor, pairs: Tensor, token_index: Tensor,
                           ids: Tensor) -> None:
        self.calls.append("sort")
        num_experts, top_k = offsets.shape[0] - 1, ids.shape[1]
        flat = ids.reshape(-1).long()
        bucket = torch.where((flat >= 0) & (flat < num_experts), flat,
                             torch.full_like(flat, num_experts))
        order = torch.argsort(bucket, stable=True)
        pairs.copy_(order)
        token_index.copy_(order // top_k)
        counts = torch.bincount(bucket, minlength=num_experts + 1)[:num_experts]
        offsets.copy_(torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))

    def _products(self, x: Tensor, w: Tensor, offsets: Tensor,
                  row_index: Optional[Tensor]) -> tuple[Tensor, int]:
        rows = row_index.shape[0] if row_index is not None else x.shape[0]
        a = x[row_index.long()] if row_index is not None else x
        out = torch.zeros(rows, w.shape[1], dtype=torch.float32)
        bounds = offsets.tolist()
        for e in range(w.shape[0]):
            out[bounds[e]:bounds[e + 1]] = a[bounds[e]:bounds[e + 1]].float() @ w[e].float().t()
        return out, bounds[-1]

    def moe_grouped_gemm(self, out: Tensor, x: Tensor, w: Tensor, offsets: Tensor,
                         row_index: Optional[Tensor] = None,
                         out_index: Optional[Tensor] = None,
                         out_scale: Optional[Tensor] = None) -> None:
        self.calls.append("gemm" + ("+gather" if row_index is not None else "")
                          + ("+scatter" if out_index is not None else ""))
        prod, end = self._products(x, w, offsets, row_index)
        dst = out_index.long()[:end] if out_index is not None else torch.arange(end)
        scale = out_scale[dst].unsqueeze(1) if out_scale is not None else 1.0
        out[dst] = (prod[:end] * scale).to(out.dtype)

    def moe_grouped_gemm_gated(self, out: Tensor, x: Tensor, w: Tensor, offsets: Tensor,
                               row_index: Optional[Tensor] = None,
                               activation: str = "silu") -> None:
        self.calls.append("gated" + ("+gather" if row_index is not None else ""))
        prod, end = self._products(x, w, offsets, row_index)
        gate, up = prod[:end].chunk(2, dim=-1)
        act = F.silu(gate) if activation == "silu" else F.gelu(
            gate, approximate="tanh" if activation == "gelu_tanh" else "none")
        out[:end] = (act * up).to(out.dtype)

    def moe_sum_topk(self, out: Tensor, x: Tensor, ids: Tensor, num_experts: int) -> None:
        self.calls.append("sum")
        valid = ((ids >= 0) & (ids < num_experts)).unsqueeze(-1)
        out.copy_(torch.where(valid, x.float(), torch.zeros(())).sum(1).to(out.dtype))


@pytest.mark.parametrize("fuse", ["all", "none", "-sort", "-gather", "-act", "-combine",
                                  "sort,combine", "gather,act"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_fused_path_pieces_match_the_reference(fuse: str, top_k: int) -> None:
    from cacheflow_runtime.layers import fused_moe

    g = _gen(11)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * INTER, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, INTER, generator=g) / INTER ** 0.5
    weights, ids = select_experts(torch.randn(T, E, generator=g), top_k, True)
    ref = per_expert_reference(x, w13, w2, weights, ids)
    pieces = fused_moe.fuse_pieces(fuse)
    kernels = _TorchKernels()
    if not pieces:  # "none": the layer would take the previous path; check it instead
        ours = fused_experts(x, w13, w2, weights, ids, SiluAndMul(), fuse="none")
    else:
        ours = fused_moe._fused_cuda(kernels, pieces, x, w13, w2, weights, ids, SiluAndMul())
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    if pieces:
        assert ("sort" in kernels.calls) == ("sort" in pieces)
        gemm1 = kernels.calls[1 if "sort" in pieces else 0]
        assert gemm1.startswith("gated" if "act" in pieces else "gemm")
        assert gemm1.endswith("+gather") == ("gather" in pieces)
        combined = "combine" in pieces
        assert kernels.calls[-1] == ("sum" if combined and top_k > 1 else
                                     "gemm+scatter" if combined else "gemm")


def test_fuse_pieces_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    from cacheflow_runtime.layers import fused_moe

    every = frozenset(fused_moe.FUSE_PIECES)
    monkeypatch.delenv(fused_moe.FUSE_ENV, raising=False)
    assert fused_moe.fuse_pieces() == every
    for value, want in (("all", every), ("1", every), ("none", set()), ("0", set()), ("", set()),
                        ("sort, act", {"sort", "act"}), ("-gather,-combine", {"sort", "act"})):
        assert fused_moe.fuse_pieces(value) == frozenset(want), value
    monkeypatch.setenv(fused_moe.FUSE_ENV, "-sort")
    assert fused_moe.fuse_pieces() == every - {"sort"}
    with pytest.raises(ValueError, match="unknown piece"):
        fused_moe.fuse_pieces("sort,gahter")
    with pytest.raises(ValueError, match="not both"):
        fused_moe.fuse_pieces("sort,-act")


def test_gated_activation_of_the_layers() -> None:
    from cacheflow_runtime.layers import fused_moe
    from cacheflow_runtime.layers.activation import GeluAndMul

    assert fused_moe._gated_activation(SiluAndMul()) == "silu"
    assert fused_moe._gated_activation(GeluAndMul("none")) == "gelu"
    assert fused_moe._gated_activation(GeluAndMul("tanh")) == "gelu_tanh"

    class Other(SiluAndMul):
        pass

    assert fused_moe._gated_activation(Other()) is None  # unknown forward: not fused
