"""rms_norm and fused_add_rms_norm on a CUDA device against plain torch (the runtime's RMSNorm
formula, HF LlamaRMSNorm). Skipped without CUDA."""

from __future__ import annotations

from typing import Any

import pytest
from elementwise_testutil import misaligned, poisoned_like, tolerance

import cacheflow_kernels as ck

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# (num_tokens, hidden): warp-per-token rows (hidden <= 1024 for 16-bit, 512 for float32),
# block-per-token rows cached in registers (1..16 accesses per thread), rows read twice (beyond),
# hidden sizes that are not a multiple of the 16-byte vector (element-wise path), and 8k tokens.
SIZES = [
    (1, 8), (7, 64), (5, 100), (3, 129), (33, 512), (9, 768), (17, 1000), (4, 1001),
    (13, 2048), (31, 4096), (6, 4095), (2, 4097), (11, 5120), (3, 8192), (5, 13824),
    (2, 16384), (2, 20000), (3, 32776), (8192, 4096),
]


def reference_rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """The runtime's RMSNorm.forward (HF LlamaRMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def reference_fused(x: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    s = x + residual
    return reference_rms_norm(s, weight, eps), s


def _inputs(dtype: Any, num_tokens: int, hidden: int, seed: int = 0) -> tuple[Any, Any]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, device="cuda").to(dtype)
    weight = (1.0 + 0.5 * torch.randn(hidden, generator=gen, device="cuda")).to(dtype)
    return x, weight


def test_cuda_available() -> None:
    assert ck.cuda_available() is True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), SIZES)
def test_rms_norm_matches_reference(dtype: Any, num_tokens: int, hidden: int) -> None:
    x, weight = _inputs(dtype, num_tokens, hidden)
    eps = 1e-6
    out = poisoned_like(x)
    ck.rms_norm(out, x, weight, eps)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, reference_rms_norm(x, weight, eps), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), SIZES)
def test_fused_add_rms_norm_matches_reference(dtype: Any, num_tokens: int, hidden: int) -> None:
    x, weight = _inputs(dtype, num_tokens, hidden)
    residual = _inputs(dtype, num_tokens, hidden, seed=1)[0]
    eps = 1e-5
    want_out, want_residual = reference_fused(x, residual, weight, eps)
    ck.fused_add_rms_norm(x, residual, weight, eps)
    torch.cuda.synchronize()
    # The sum is one float32 add rounded to the dtype, exactly as torch computes it.
    torch.testing.assert_close(residual, want_residual, rtol=0, atol=0)
    torch.testing.assert_close(x, want_out, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_rms_norm(dtype: Any) -> None:
    x, weight = _inputs(dtype, 19, 2048)
    want = reference_rms_norm(x, weight, 1e-6)
    ck.rms_norm(x, x, weight, 1e-6)
    torch.testing.assert_close(x, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sum_of_squares_is_reduced_in_float32(dtype: Any) -> None:
    """x^2 of these values overflows float16 (> 65504); the reduction must not."""
    x, weight = _inputs(dtype, 8, 4096)
    x = (x.float() * 300).to(dtype)
    out = poisoned_like(x)
    ck.rms_norm(out, x, weight, 1e-6)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_rms_norm(x, weight, 1e-6), **tolerance(dtype))


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_eps_values(eps: float) -> None:
    x, weight = _inputs(torch.float32, 6, 256)
    x = x * 0.01  # small rows: eps matters
    out = poisoned_like(x)
    ck.rms_norm(out, x, weight, eps)
    torch.testing.assert_close(out, reference_rms_norm(x, weight, eps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [512, 4096])
def test_misaligned_tensors(dtype: Any, hidden: int) -> None:
    """Views starting one element into an allocation take the element-wise path."""
    x, weight = _inputs(dtype, 10, hidden)
    x, weight = misaligned(x), misaligned(weight)
    out = misaligned(poisoned_like(x))
    ck.rms_norm(out, x, weight, 1e-6)
    torch.testing.assert_close(out, reference_rms_norm(x, weight, 1e-6), **tolerance(dtype))
    residual = misaligned(_inputs(dtype, 10, hidden, seed=2)[0])
    want_out, want_residual = reference_fused(x, residual, weight, 1e-6)
    ck.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, want_residual, rtol=0, atol=0)
    torch.testing.assert_close(x, want_out, **tolerance(dtype))


def test_empty_batch() -> None:
    x, weight = _inputs(torch.float16, 0, 64)
    ck.rms_norm(torch.empty_like(x), x, weight, 1e-6)
    ck.fused_add_rms_norm(x, torch.empty_like(x), weight, 1e-6)
    torch.cuda.synchronize()


def test_runs_on_torch_current_stream() -> None:
    """Inputs are rewritten on a busy side stream just before the call: a kernel launched on any
    other stream would read the old inputs."""
    x, weight = _inputs(torch.float16, 256, 4096)
    new_x = torch.randn_like(x)
    want = reference_rms_norm(new_x, weight, 1e-6)
    out = poisoned_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.copy_(new_x)
        ck.rms_norm(out, x, weight, 1e-6)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, **tolerance(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype: Any) -> None:
    x, weight = _inputs(dtype, 37, 4096)
    residual = _inputs(dtype, 37, 4096, seed=3)[0]
    out = poisoned_like(x)
    x2 = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (loads the library)
        ck.rms_norm(out, x, weight, 1e-6)
        ck.fused_add_rms_norm(x2, residual, weight, 1e-6)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.rms_norm(out, x, weight, 1e-6)
        ck.fused_add_rms_norm(x2, residual, weight, 1e-6)
    for seed in (10, 11):
        fresh_x, fresh_w = _inputs(dtype, 37, 4096, seed=seed)
        fresh_r = _inputs(dtype, 37, 4096, seed=seed + 100)[0]
        x.copy_(fresh_x)
        x2.copy_(fresh_x)
        weight.copy_(fresh_w)
        residual.copy_(fresh_r)
        out.fill_(float("nan"))
        want_out = reference_rms_norm(fresh_x, fresh_w, 1e-6)
        want_fused, want_residual = reference_fused(fresh_x, fresh_r, fresh_w, 1e-6)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want_out, **tolerance(dtype))
        torch.testing.assert_close(residual, want_residual, rtol=0, atol=0)
        torch.testing.assert_close(x2, want_fused, **tolerance(dtype))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_second_device_while_first_is_current() -> None:
    with torch.cuda.device(1):
        x, weight = _inputs(torch.float32, 17, 1024)
    x, weight = x.to("cuda:1"), weight.to("cuda:1")
    out = poisoned_like(x)
    torch.cuda.set_device(0)
    ck.rms_norm(out, x, weight, 1e-6)
    torch.cuda.synchronize(1)
    torch.testing.assert_close(out, reference_rms_norm(x, weight, 1e-6), rtol=1e-5, atol=1e-5)
