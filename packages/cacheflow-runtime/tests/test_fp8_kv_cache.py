"""The FP8 KV cache on the runtime side: the config, the block sizing, the cache engine, the
reference backend's emulation (close to the float path, never equal), the K/V scales of
PagedAttention and their checkpoint hook; on a GPU, the kernels against that emulation."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from test_attention_backends import _run, _step
from torch import nn

from cacheflow_runtime.attention import PagedAttention, cuda, load_kv_scale, reference
from cacheflow_runtime.config import CacheConfig, ModelConfig, kv_cache_torch_dtype
from cacheflow_runtime.errors import InvalidArgumentError
from cacheflow_runtime.model_executor.cache_engine import CacheEngine, block_bytes

FP8 = torch.float8_e4m3fn


def _model_config(dtype: torch.dtype = torch.float16) -> ModelConfig:
    return ModelConfig(model_path="x", architecture="LlamaForCausalLM", hf_config=None,
                       num_layers=3, num_attention_heads=8, num_kv_heads=2, head_size=64,
                       hidden_size=512, vocab_size=100, max_model_len=256, dtype=dtype)


@pytest.mark.parametrize(("given", "stored"), [("auto", "auto"), ("fp8", "fp8"),
                                               ("fp8_e4m3", "fp8")])
def test_cache_dtype_names(given: str, stored: str) -> None:
    assert CacheConfig(cache_dtype=given).cache_dtype == stored


@pytest.mark.parametrize("given", ["int8", "fp8_e5m2", None, 8])
def test_unknown_cache_dtype_is_a_clear_error(given: object) -> None:
    with pytest.raises(InvalidArgumentError,
                       match=r"kv_cache_dtype must be one of .*got " + re.escape(repr(given))
                       ) as err:
        CacheConfig(cache_dtype=given)  # type: ignore[arg-type]
    assert err.value.field == "kv_cache_dtype" and err.value.value == given


def test_kv_cache_torch_dtype() -> None:
    assert kv_cache_torch_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16) is FP8
    assert kv_cache_torch_dtype("fp8_e4m3", torch.float32) is FP8


@pytest.mark.parametrize(("dtype", "ratio"), [(torch.float16, 2), (torch.bfloat16, 2),
                                              (torch.float32, 4)])
def test_fp8_blocks_hold_twice_the_tokens(dtype: torch.dtype, ratio: int) -> None:
    config = _model_config(dtype)
    auto = block_bytes(config, 16)
    fp8 = block_bytes(config, 16, cache_dtype="fp8")
    assert fp8 == 2 * 3 * 16 * 2 * 64  # K and V, 3 layers, 16 tokens, 2 KV heads, 64 dims
    assert auto == ratio * fp8
    budget = 1000 * auto
    assert budget // fp8 == ratio * (budget // auto)  # the same memory: ratio x the blocks


def test_cache_engine_allocates_and_moves_fp8_blocks() -> None:
    engine = CacheEngine(_model_config(), CacheConfig(cache_dtype="fp8"), torch.device("cpu"),
                         num_device_blocks=6, num_cpu_blocks=4)
    assert engine.dtype is FP8
    key_cache, value_cache = engine.device_cache[0]
    assert key_cache.dtype is FP8 and key_cache.shape == (6, 16, 2, 64)
    assert engine.cpu_cache[2][1].dtype is FP8
    for layer, (k, v) in enumerate(engine.device_cache):
        k.view(torch.uint8).copy_(torch.arange(k.numel()).reshape(k.shape) % 251 + layer)
        v.view(torch.uint8).copy_(torch.arange(v.numel()).reshape(v.shape) % 241 + layer)
    before = [(k.view(torch.uint8).clone(), v.view(torch.uint8).clone())
              for k, v in engine.device_cache]
    engine.copy([(1, 4), (1, 5)])
    engine.swap_out([(2, 0)])
    engine.swap_in([(0, 3)])
    for (k, v), (k0, v0) in zip(engine.device_cache, before):
        for cache, old in ((k, k0), (v, v0)):
            raw = cache.view(torch.uint8)
            assert torch.equal(raw[4], old[1]) and torch.equal(raw[5], old[1])
            assert torch.equal(raw[3], old[2])
            assert torch.equal(raw[0], old[0])


def test_reference_writes_quantized_bytes() -> None:
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(5, 2, 8, generator=gen) * 3
    value = torch.randn(5, 2, 8, generator=gen)
    key_cache = torch.zeros(4, 8, 2, 8, dtype=FP8)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.tensor([3, -1, 17, 30, 8])
    reference.reshape_and_cache(key, value, key_cache, value_cache, slots, 0.01, 0.5)
    flat_k = key_cache.view(-1, 2, 8).float()
    flat_v = value_cache.view(-1, 2, 8).float()
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        want_k = (key[token] / 0.01).clamp(-448, 448).to(FP8).float()
        assert torch.equal(flat_k[slot], want_k)
        assert torch.equal(flat_v[slot], (value[token] / 0.5).to(FP8).float())
    assert flat_k.abs().max() == 448.0  # |key| / 0.01 > 448 somewhere: saturated, not NaN
    untouched = [s for s in range(32) if s not in slots.tolist()]
    assert flat_k[untouched].abs().sum() == 0


def _fp8_step(step: dict[str, Any], k_scale: float = 1.0, v_scale: float = 1.0) -> dict[str, Any]:
    """The step with the cache contents quantized (NaN poison kept) into FP8 caches."""
    out = dict(step)
    key_cache, value_cache = step["kv_cache"]
    out["kv_cache"] = (reference.quantize_fp8(key_cache, k_scale),
                       reference.quantize_fp8(value_cache, v_scale))
    return out


@pytest.mark.parametrize(("query_lens", "cached"), [([1, 1, 1], [5, 40, 16]),
                                                    ([9, 1, 30], [0, 17, 33])])
def test_reference_fp8_path_is_close_to_the_float_path(query_lens: list[int],
                                                       cached: list[int]) -> None:
    step = _step(query_lens, cached, seed=5)
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference")
    exact = _run(layer, step)
    fp8 = _run(layer, _fp8_step(step))
    assert torch.isfinite(fp8).all()
    err = float((fp8 - exact).norm() / exact.norm())
    assert 0 < err < 0.08, err  # E4M3 keeps 3 mantissa bits: ~2-4% error, never exact


def test_scales_matter_for_fp8_and_are_ignored_otherwise() -> None:
    step = _step([1, 6], [20, 3], seed=9)
    scaled = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference")
    scaled.set_kv_scale("k", 0.05)
    scaled.set_kv_scale("v", 0.02)
    plain = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference")
    # Float caches: the scales do nothing.
    torch.testing.assert_close(_run(scaled, step), _run(plain, step), rtol=0, atol=0)
    # FP8 caches (the cached tokens and this step's, all written with the layer's scales): read
    # back with them the result is close; read with the default 1.0 it is far off.
    fp8_step = _fp8_step(step, 0.05, 0.02)
    exact = _run(plain, step)
    err_scaled = float((_run(scaled, fp8_step) - exact).norm() / exact.norm())
    assert err_scaled < 0.08
    wrong = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference")
    wrong.set_kv_scale("kv", 1.0)
    err_wrong = float((_run(wrong, fp8_step) - exact).norm() / exact.norm())
    assert err_wrong > 0.5


def test_set_kv_scale_checks_its_input() -> None:
    layer = PagedAttention(4, 64, 0.125)
    assert (layer.k_scale, layer.v_scale) == (1.0, 1.0)
    layer.set_kv_scale("kv", 0.25)
    assert (layer.k_scale, layer.v_scale) == (0.25, 0.25)
    with pytest.raises(ValueError, match="finite number > 0, got -1.0"):
        layer.set_kv_scale("k", -1.0)
    with pytest.raises(ValueError, match="which must be 'k', 'v' or 'kv'"):
        layer.set_kv_scale("q", 1.0)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k_proj = nn.Linear(4, 4)
        self.attn = PagedAttention(4, 64, 0.125)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"self_attn": _Attention()})
                                     for _ in range(2)])


def test_load_kv_scale_finds_the_attention_layer() -> None:
    model = _Model()
    assert load_kv_scale(model, "layers.0.self_attn.k_scale", torch.tensor(0.5))
    assert load_kv_scale(model, "layers.0.self_attn.v_scale", torch.tensor([0.25]))
    assert load_kv_scale(model, "layers.1.self_attn.k_proj.k_scale", torch.tensor(2.0))
    assert load_kv_scale(model, "layers.1.self_attn.kv_scale", torch.tensor(0.125,
                                                                            dtype=torch.bfloat16))
    first, second = (layer["self_attn"].attn for layer in model.layers)
    assert (first.k_scale, first.v_scale) == (0.5, 0.25)
    assert (second.k_scale, second.v_scale) == (0.125, 0.125)
    assert not load_kv_scale(model, "layers.0.self_attn.k_proj.weight", torch.ones(1))
    assert not load_kv_scale(model, "layers.7.self_attn.k_scale", torch.ones(()))
    assert not load_kv_scale(model, "layers.k_scale", torch.ones(()))  # two layers below
    with pytest.raises(ValueError, match=r"one number, got a tensor of shape \[2\]"):
        load_kv_scale(model, "layers.0.self_attn.k_scale", torch.ones(2))
    with pytest.raises(ValueError, match="finite number > 0"):
        load_kv_scale(model, "layers.0.self_attn.v_scale", torch.tensor(float("inf")))


def test_cuda_backend_passes_scales_and_soft_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    class Fake:
        PAGED_PREFILL_MAX_HEAD_SIZE = 256

        def paged_attention(self, out: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(("decode", kwargs))
            out.zero_()

        def paged_prefill_attention(self, out: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(("prefill", kwargs))
            out.zero_()

    monkeypatch.setattr(cuda, "cacheflow_kernels", Fake())
    monkeypatch.setattr(cuda, "supports_decode", lambda q, kc: True)
    monkeypatch.setattr(cuda, "supports_prefill", lambda *a: True)
    step = _fp8_step(_step([1, 1], [3, 9]))
    q = step["query"].view(2, 8, 64)
    cuda.paged_attention(q, *step["kv_cache"], step["metadata"], 0.125, k_scale=0.5,
                         v_scale=0.25, logits_soft_cap=30.0)
    step = _fp8_step(_step([4, 1], [0, 9]))
    q = step["query"].view(5, 8, 64)
    cuda.paged_attention(q, *step["kv_cache"], step["metadata"], 0.125, k_scale=0.5,
                         v_scale=0.25)
    assert [(name, kw["k_scale"], kw["v_scale"], kw["logits_soft_cap"])
            for name, kw in calls] == [("decode", 0.5, 0.25, 30.0), ("prefill", 0.5, 0.25, None)]


def test_cuda_backend_accepts_fp8_caches() -> None:
    q = torch.zeros(2, 4, 64, dtype=torch.float16)
    cache = torch.zeros(3, 16, 1, 64, dtype=FP8)
    if not q.is_cuda:
        assert not cuda.supports_decode(q, cache)  # CPU tensors never take the kernels
    assert cuda._cache_dtype_ok(q, cache)
    assert not cuda._cache_dtype_ok(q, cache.view(torch.int8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("query_lens", "cached"),
    [([1] * 6, [0, 5, 40, 16, 300, 1000]),  # decode: the decode kernel
     ([1, 9, 1], [17, 0, 64]),              # mixed: the prefill kernel
     ([300, 1, 64], [700, 17, 0])],         # prefix-cached prompt, decode, prompt
)
def test_fp8_kernels_match_the_reference_emulation(dtype: torch.dtype, query_lens: list[int],
                                                   cached: list[int]) -> None:
    """The kernels write the same FP8 bytes as the reference's quantization and attend over
    them like its dequantization (the fp8 path of the whole cuda backend)."""
    assert cuda.available()
    step = _step(query_lens, cached, num_heads=16, num_kv_heads=4, head_size=128,
                 dtype=dtype, device="cuda", seed=4)
    step["kv_cache"] = tuple(reference.quantize_fp8(c, 0.05) for c in step["kv_cache"])
    fast = PagedAttention(16, 128, 128 ** -0.5, num_kv_heads=4)
    slow = PagedAttention(16, 128, 128 ** -0.5, num_kv_heads=4, backend="reference")
    for layer in (fast, slow):
        layer.set_kv_scale("k", 0.05)
        layer.set_kv_scale("v", 0.05)
    assert fast.backend_for(step["query"]) is cuda
    kv_fast = tuple(c.clone() for c in step["kv_cache"])
    kv_slow = tuple(c.clone() for c in step["kv_cache"])
    out = fast(step["query"], step["key"], step["value"], kv_fast, step["metadata"])
    ref = slow(step["query"], step["key"], step["value"], kv_slow, step["metadata"])
    for a, b in zip(kv_fast, kv_slow):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.isfinite(out).all()
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("head_size", [128, 256])
@pytest.mark.parametrize(("query_lens", "cached"), [([1] * 4, [5, 40, 300, 1000]),
                                                    ([1, 9, 64], [17, 0, 100])])
def test_soft_cap_kernels_match_the_reference(head_size: int, query_lens: list[int],
                                              cached: list[int]) -> None:
    step = _step(query_lens, cached, num_heads=8, num_kv_heads=2, head_size=head_size,
                 dtype=torch.bfloat16, device="cuda", seed=6)
    q = step["query"].view(-1, 8, head_size) * 4  # scores well past the cap
    key_cache, value_cache = step["kv_cache"]
    meta = step["metadata"]
    cuda.reshape_and_cache(step["key"].view(-1, 2, head_size),
                           step["value"].view(-1, 2, head_size), key_cache, value_cache,
                           meta.slot_mapping)
    out = cuda.paged_attention(q, key_cache, value_cache, meta, head_size ** -0.5,
                               logits_soft_cap=5.0)
    ref = reference.paged_attention(q, key_cache, value_cache, meta, head_size ** -0.5,
                                    logits_soft_cap=5.0)
    uncapped = reference.paged_attention(q, key_cache, value_cache, meta, head_size ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
    assert float((ref.float() - uncapped.float()).abs().max()) > 0.1
