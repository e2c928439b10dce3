"""The runtime's layers and CacheEngine on CUDA run the kernels of cacheflow-kernels, with the
results of their torch code (run here on the same card by switching the kernels off)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import cacheflow_kernels
from cacheflow_runtime.layers import activation, layernorm, rotary_embedding
from cacheflow_runtime.layers.activation import GeluAndMul, SiluAndMul, gelu_fast, gelu_new
from cacheflow_runtime.layers.layernorm import RMSNorm
from cacheflow_runtime.layers.rotary_embedding import RotaryEmbedding
from cacheflow_runtime.model_executor import cache_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of every kernel the layers use."""
    counts: dict[str, int] = {}
    for name in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "gelu_and_mul", "gelu_new",
                 "gelu_fast", "rotary_embedding", "copy_blocks", "swap_blocks"):
        original = getattr(cacheflow_kernels, name)

        def counted(*args: Any, _name: str = name, _fn: Callable[..., Any] = original,
                    **kwargs: Any) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(cacheflow_kernels, name, counted)
    return counts


def torch_path(monkeypatch: pytest.MonkeyPatch, *modules: Any) -> None:
    """Switches the kernels off in ``modules``: their layers run the torch code."""
    for module in modules:
        monkeypatch.setattr(module, "kernels_for", lambda *tensors: None)


def _ulps(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal within one rounding of ``dtype`` (relative), elementwise."""
    torch.testing.assert_close(got.float(), want.float(), rtol=_ulps(dtype), atol=_ulps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual_form(dtype: torch.dtype, calls: dict[str, int],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    norm = RMSNorm(1024, eps=1e-5, params_dtype=dtype).cuda()
    norm.weight.data = (1 + 0.1 * torch.randn(1024, generator=gen, device="cuda")).to(dtype)
    x = torch.randn(37, 1024, generator=gen, device="cuda").to(dtype)
    r = torch.randn(37, 1024, generator=gen, device="cuda").to(dtype)
    out = norm(x)
    fused_out, fused_res = norm(x.clone(), r.clone())
    assert calls == {"rms_norm": 1, "fused_add_rms_norm": 1}
    torch_path(monkeypatch, layernorm)
    want = norm(x)
    want_out, want_res = norm(x, r)
    _assert_close(out, want, dtype)
    assert torch.equal(fused_res, want_res)  # the add is one rounding in both
    _assert_close(fused_out, want_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations(dtype: torch.dtype, calls: dict[str, int],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (2 * torch.randn(19, 2 * 688, generator=gen, device="cuda")).to(dtype)
    got = {"silu": SiluAndMul()(x), "gelu": GeluAndMul("none")(x),
           "gelu_tanh": GeluAndMul("tanh")(x)}
    flat = x[:, :688].contiguous()
    got_new, got_fast = gelu_new(flat), gelu_fast(flat)
    assert calls == {"silu_and_mul": 1, "gelu_and_mul": 2, "gelu_new": 1, "gelu_fast": 1}
    torch_path(monkeypatch, activation)
    for name, layer in (("silu", SiluAndMul()), ("gelu", GeluAndMul("none")),
                        ("gelu_tanh", GeluAndMul("tanh"))):
        _assert_close(got[name], layer(x), dtype)
    # The kernels compute gelu_new / gelu_fast in float32 and round once; the torch code rounds
    # after every op in 16-bit dtypes, so compare with it in float32.
    _assert_close(got_new, gelu_new(flat.float()).to(dtype), dtype)
    _assert_close(got_fast, gelu_fast(flat.float()).to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("neox", "rotary_dim"), [(True, 64), (False, 64), (True, 32)])
def test_rotary_in_place_on_qkv_slices(dtype: torch.dtype, neox: bool, rotary_dim: int,
                                       calls: dict[str, int],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    heads, kv_heads, head_size, tokens = 4, 2, 64, 23
    rope = RotaryEmbedding(head_size, rotary_dim, 512, 10000.0, neox).cuda()
    gen = torch.Generator(device="cuda").manual_seed(2)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=gen,
                      device="cuda").to(dtype)
    positions = torch.randint(0, 512, (tokens,), generator=gen, device="cuda")
    q_size, kv_size = heads * head_size, kv_heads * head_size
    want_q, want_k = qkv[:, :q_size].clone(), qkv[:, q_size:q_size + kv_size].clone()
    q, k = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size]
    got_q, got_k = rope(positions, q, k)
    assert calls == {"rotary_embedding": 1}
    assert got_q.data_ptr() == q.data_ptr()  # rotated in place
    torch_path(monkeypatch, rotary_embedding)
    ref_q, ref_k = rope(positions, want_q, want_k)
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)


def test_dynamic_ntk_rotary_keeps_the_torch_code(calls: dict[str, int]) -> None:
    rope = RotaryEmbedding(64, 64, 128, 10000.0, True,
                           {"rope_type": "dynamic", "factor": 2.0}).cuda()
    q = torch.randn(5, 128, device="cuda")
    k = torch.randn(5, 64, device="cuda")
    rope(torch.arange(200, 205, device="cuda"), q, k, [5], [205])
    assert calls == {}


class _Config:
    """The fields CacheEngine reads."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.num_kv_heads, self.head_size, self.num_layers, self.dtype = 2, 64, 3, dtype


class _CacheConfig:
    block_size = 16
    cache_dtype = "auto"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cache_engine_swap_and_copy_on_cuda(dtype: torch.dtype, calls: dict[str, int]) -> None:
    engine = cache_engine.CacheEngine(_Config(dtype), _CacheConfig(), torch.device("cuda"),
                                      num_device_blocks=12, num_cpu_blocks=10)
    assert engine.cpu_cache[0][0].is_pinned()
    gen = torch.Generator(device="cuda").manual_seed(3)
    for k, v in engine.device_cache:
        k.copy_(torch.randn(k.shape, generator=gen, device="cuda").to(dtype))
        v.copy_(torch.randn(v.shape, generator=gen, device="cuda").to(dtype))
    for k, v in engine.cpu_cache:
        k.fill_(math.nan)
        v.fill_(math.nan)
    before = [(k.clone(), v.clone()) for k, v in engine.device_cache]

    engine.swap_out([(3, 0), (7, 5), (8, 6)])
    torch.cuda.synchronize()
    for (k, v), (dk, dv) in zip(engine.cpu_cache, before):
        assert torch.equal(k[[0, 5, 6]], dk[[3, 7, 8]].cpu())
        assert torch.equal(v[[0, 5, 6]], dv[[3, 7, 8]].cpu())
        assert torch.isnan(k[1]).all()

    engine.copy([(0, 1), (0, 2), (4, 9)])
    engine.swap_in([(0, 10), (5, 11)])
    torch.cuda.synchronize()
    for (k, v), (dk, dv) in zip(engine.device_cache, before):
        assert torch.equal(k[[1, 2, 9]], dk[[0, 0, 4]])
        assert torch.equal(v[[1, 2, 9]], dv[[0, 0, 4]])
        assert torch.equal(k[[10, 11]], dk[[3, 7]]) and torch.equal(v[[10, 11]], dv[[3, 7]])
        assert torch.equal(k[[0, 3, 4]], dk[[0, 3, 4]])  # untouched
    assert calls == {"swap_blocks": 2 * 2 * 3, "copy_blocks": 1}
