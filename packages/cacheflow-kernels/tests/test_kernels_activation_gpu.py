"""silu_and_mul, gelu_and_mul, gelu_new and gelu_fast on a CUDA device against plain torch (the
runtime's activation layers). Skipped without CUDA."""

from __future__ import annotations

import math
from typing import Any

import pytest
from elementwise_testutil import misaligned, poisoned_like, tolerance

import cacheflow_kernels as ck

torch = pytest.importorskip("torch")
F = pytest.importorskip("torch.nn.functional")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def ref_silu_and_mul(x: Any) -> Any:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def ref_gelu_and_mul(x: Any, approximate: str) -> Any:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


def ref_gelu_new(x: Any) -> Any:
    """The runtime's gelu_new, evaluated in float32 and rounded once (as the kernel does)."""
    h = x.float()
    y = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))
    return y.to(x.dtype)


def ref_gelu_fast(x: Any) -> Any:
    h = x.float()
    return (0.5 * h * (1.0 + torch.tanh(h * 0.7978845608 * (1.0 + 0.044715 * h * h)))).to(x.dtype)


def _x(shape: tuple[int, ...], dtype: Any, seed: int = 0, scale: float = 3.0) -> Any:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, device="cuda")).to(dtype)


# x shapes [..., 2 * d]: d not a multiple of any vector width, 3-D inputs, LLaMA sizes, 8k tokens.
AND_MUL_SHAPES = [
    (1, 2), (1, 16), (7, 26), (5, 2 * 100), (3, 4, 2 * 36), (33, 2 * 4096), (4, 2 * 11008),
    (9, 2 * 4097), (8192, 2 * 4096),
]
FLAT_SHAPES = [(1,), (7,), (7, 13), (3, 5, 1001), (33, 4096), (8192, 4096)]


def _and_mul(name: str, out: Any, x: Any) -> Any:
    if name == "silu":
        ck.silu_and_mul(out, x)
        return ref_silu_and_mul(x)
    approximate = name.split("_")[1]
    ck.gelu_and_mul(out, x, approximate)
    return ref_gelu_and_mul(x, approximate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_none", "gelu_tanh"])
@pytest.mark.parametrize("shape", AND_MUL_SHAPES)
def test_and_mul_matches_reference(dtype: Any, act: str, shape: tuple[int, ...]) -> None:
    x = _x(shape, dtype)
    out = poisoned_like(x[..., : shape[-1] // 2].contiguous())
    want = _and_mul(act, out, x)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_none", "gelu_tanh"])
def test_and_mul_misaligned(dtype: Any, act: str) -> None:
    x = misaligned(_x((10, 2 * 256), dtype))
    out = misaligned(poisoned_like(x[..., :256].contiguous()), offset=3)
    want = _and_mul(act, out, x)
    torch.testing.assert_close(out, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gelu_new", "gelu_fast"])
@pytest.mark.parametrize("shape", FLAT_SHAPES)
def test_flat_matches_reference(dtype: Any, name: str, shape: tuple[int, ...]) -> None:
    x = _x(shape, dtype)
    out = poisoned_like(x)
    getattr(ck, name)(out, x)
    torch.cuda.synchronize()
    want = ref_gelu_new(x) if name == "gelu_new" else ref_gelu_fast(x)
    torch.testing.assert_close(out, want, **tolerance(dtype))


@pytest.mark.parametrize("name", ["gelu_new", "gelu_fast"])
def test_flat_in_place_and_misaligned(name: str) -> None:
    x = misaligned(_x((5, 999), torch.float16))
    want = ref_gelu_new(x) if name == "gelu_new" else ref_gelu_fast(x)
    getattr(ck, name)(x, x)
    torch.testing.assert_close(x, want, **tolerance(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_new_close_to_the_runtime_formula_in_dtype(dtype: Any) -> None:
    """The runtime's gelu_new rounds every step in the dtype; the kernel rounds once: close."""
    x = _x((64, 512), dtype, scale=2.0)
    out = poisoned_like(x)
    ck.gelu_new(out, x)
    runtime = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    torch.testing.assert_close(out, runtime, rtol=5e-2, atol=5e-2)


def test_large_inputs_saturate_cleanly() -> None:
    x = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 3.0]], device="cuda")
    x2 = torch.cat([x, torch.ones_like(x)], dim=-1)
    out = poisoned_like(x)
    ck.silu_and_mul(out, x2)
    torch.testing.assert_close(out, ref_silu_and_mul(x2), rtol=1e-5, atol=1e-5)
    for name, ref in (("gelu_new", ref_gelu_new), ("gelu_fast", ref_gelu_fast)):
        out = poisoned_like(x)
        getattr(ck, name)(out, x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)


def test_empty() -> None:
    x = torch.empty(0, 8, device="cuda", dtype=torch.float16)
    ck.silu_and_mul(torch.empty(0, 4, device="cuda", dtype=torch.float16), x)
    ck.gelu_new(torch.empty_like(x), x)
    torch.cuda.synchronize()


def test_runs_on_torch_current_stream() -> None:
    x = _x((512, 2 * 4096), torch.bfloat16)
    new_x = torch.randn_like(x)
    out = poisoned_like(x[:, :4096].contiguous())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.copy_(new_x)
        ck.silu_and_mul(out, x)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref_silu_and_mul(new_x), **tolerance(torch.bfloat16))


def test_cuda_graph_capture_and_replay() -> None:
    x = _x((37, 2 * 1024), torch.float16)
    out = poisoned_like(x[:, :1024].contiguous())
    flat = poisoned_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ck.silu_and_mul(out, x)
        ck.gelu_fast(flat, x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.silu_and_mul(out, x)
        ck.gelu_fast(flat, x)
    fresh = _x((37, 2 * 1024), torch.float16, seed=9)
    x.copy_(fresh)
    out.fill_(float("nan"))
    flat.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref_silu_and_mul(fresh), **tolerance(torch.float16))
    torch.testing.assert_close(flat, ref_gelu_fast(fresh), **tolerance(torch.float16))
