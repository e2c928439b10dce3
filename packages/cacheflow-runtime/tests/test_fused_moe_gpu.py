"""The MoE layer on CUDA in bfloat16/float16 (the grouped expert kernel) against its torch path
on the same weights in float32. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from cacheflow_runtime.kernels import cuda_ready
from cacheflow_runtime.layers.activation import SiluAndMul
from cacheflow_runtime.layers.fused_moe import fused_experts, select_experts

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
