"""The MoE layer on CUDA in bfloat16/float16 (the grouped expert kernel) against its torch path
on the same weights in float32. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from cacheflow_runtime.kernels import cuda_ready
from cacheflow_runtime.layers.activation import SiluAndMul
from cacheflow_runtime.layers.fused_moe import fused_experts, per_expert_reference, select_experts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens, experts, top_k, hidden, inter",
                         [(1, 8, 2, 64, 96), (37, 8, 2, 256, 344), (300, 16, 4, 128, 80)])
def test_kernel_path_matches_torch_path(dtype: torch.dtype, tokens: int, experts: int,
                                        top_k: int, hidden: int, inter: int) -> None:
    assert cuda_ready(), "the kernel library must load where CUDA is available"
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    weights, ids = select_experts(torch.randn(tokens, experts, generator=g), top_k, True)
    # The same rounded inputs on both sides; the reference computes in float32 on the CPU.
    x, w13, w2 = (t.to(dtype) for t in (x, w13, w2))
    ref = fused_experts(x.float(), w13.float(), w2.float(), weights, ids, SiluAndMul())
    ours = fused_experts(x.cuda(), w13.cuda(), w2.cuda(), weights.cuda(), ids.cuda(),
                         SiluAndMul())
    assert ours.dtype == dtype
    scale = ref.abs().max().item()
    err = (ours.float().cpu() - ref).abs().max().item()
    assert err <= 3e-2 * scale, f"max abs error {err:.3g} against output scale {scale:.3g}"


# ---- the fused path (sort, gather, gated activation, weighted combine on the kernels) ------------

SHAPES = [  # tokens, experts, top_k, hidden, inter
    (1, 8, 2, 64, 96),
    (1, 8, 1, 128, 64),
    (37, 8, 2, 256, 344),
    (300, 16, 4, 128, 80),
    (513, 40, 1, 128, 64),
    (200, 60, 4, 256, 176),
    (64, 8, 3, 1024, 128),
    (4096, 8, 2, 1024, 2048),
]


def _case(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
          dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(tokens + 7 * experts + top_k)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    weights, ids = select_experts(torch.randn(tokens, experts, generator=g), top_k, True)
    return tuple(t.cuda() for t in (x, w13, w2, weights, ids))


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.float().abs().max().item()
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= 3e-2 * scale, f"{what}: max abs error {err:.3g} against scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_fused_path_matches_unfused_and_reference(dtype: torch.dtype, shape: tuple) -> None:
    x, w13, w2, weights, ids = _case(*shape, dtype)
    ref = per_expert_reference(x.float(), w13.float(), w2.float(), weights, ids)
    fused = fused_experts(x, w13, w2, weights, ids, SiluAndMul(), fuse="all")
    unfused = fused_experts(x, w13, w2, weights, ids, SiluAndMul(), fuse="none")
    assert fused.dtype == dtype and fused.shape == (shape[0], shape[3])
    _close(fused, ref, "fused")
    _close(unfused, ref, "unfused")
    _close(fused, unfused, "fused vs unfused")
    again = fused_experts(x, w13, w2, weights, ids, SiluAndMul(), fuse="all")
    assert torch.equal(fused, again), "the fused path must be deterministic"


@pytest.mark.parametrize("fuse", ["-sort", "-gather", "-act", "-combine", "sort", "gather",
                                  "act", "combine"])
def test_each_piece_alone_and_left_out(fuse: str) -> None:
    x, w13, w2, weights, ids = _case(300, 16, 4, 128, 80, torch.bfloat16)
    ref = per_expert_reference(x.float(), w13.float(), w2.float(), weights, ids)
    _close(fused_experts(x, w13, w2, weights, ids, SiluAndMul(), fuse=fuse), ref, fuse)


def test_env_selects_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w13, w2, weights, ids = _case(37, 8, 2, 256, 344, torch.bfloat16)
    monkeypatch.setenv("CACHEFLOW_MOE_FUSE", "none")
    unfused = fused_experts(x, w13, w2, weights, ids, SiluAndMul())
    monkeypatch.setenv("CACHEFLOW_MOE_FUSE", "all")
    fused = fused_experts(x, w13, w2, weights, ids, SiluAndMul())
    _close(fused, unfused, "env")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_experts_fuse_their_activation(approximate: str) -> None:
    from cacheflow_runtime.layers.activation import GeluAndMul

    x, w13, w2, weights, ids = _case(200, 8, 2, 128, 96, torch.float16)
    act = GeluAndMul(approximate)
    fused = fused_experts(x, w13, w2, weights, ids, act, fuse="all")
    unfused = fused_experts(x, w13, w2, weights, ids, act, fuse="none")
    _close(fused, unfused, f"gelu {approximate}")


def test_fused_layer_is_capturable_in_a_cuda_graph() -> None:
    x, w13, w2, weights, ids = _case(256, 8, 2, 128, 96, torch.bfloat16)
    fused_experts(x, w13, w2, weights, ids, SiluAndMul(), fuse="all")  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids, SiluAndMul(), fuse="all")
    g = torch.Generator().manual_seed(99)
    new_weights, new_ids = select_experts(torch.randn(256, 8, generator=g), 2, True)
    weights.copy_(new_weights.cuda())
    ids.copy_(new_ids.cuda())
    graph.replay()
    torch.cuda.synchronize()
    ref = per_expert_reference(x.float(), w13.float(), w2.float(), weights, ids)
    _close(out, ref, "graph replay")
