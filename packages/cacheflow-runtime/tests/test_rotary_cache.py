"""The rotary attention layer's fused rotation and cache write (``RotaryEmbedding.
forward_with_cache`` -> ``cacheflow_kernels.rotary_embedding_with_cache``, unless
CACHEFLOW_ROTARY_CACHE=0): where it applies, and that the layer's output and caches are those of
the two-kernel path. The CPU tests pin where it does not apply; the GPU ones (``gpu`` marker)
compare the paths bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_attention_backends import _step

import cacheflow_kernels
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.kernels import ATTN_ROTARY_FUSE_ENV
from cacheflow_runtime.layers.attention import GPTNeoXCacheFlowAttention


def _layer(num_heads: int = 8, num_kv_heads: int = 2, head_size: int = 64,
           rotary_dim: int | None = None, is_neox: bool = True,
           rope_scaling: dict[str, Any] | None = None) -> GPTNeoXCacheFlowAttention:
    return GPTNeoXCacheFlowAttention(num_heads, head_size, head_size ** -0.5,
                                     rotary_dim or head_size, max_position=512,
                                     is_neox_style=is_neox, num_kv_heads=num_kv_heads,
                                     rope_scaling=rope_scaling)


def _positions(metadata: InputMetadata, device: str = "cpu") -> torch.Tensor:
    pos = [c - q + i for q, c in zip(metadata.query_lens, metadata.context_lens_host)
           for i in range(q)]
    return torch.tensor(pos, dtype=torch.int64, device=device)


def _qkv_step(step: dict[str, Any]) -> dict[str, Any]:
    """The step's query, key and value as slices of one fused qkv tensor (the layout the models
    hand the layer)."""
    qkv = torch.cat((step["query"], step["key"], step["value"]), dim=-1)
    q, k = step["query"].shape[1], step["key"].shape[1]
    return {**step, "query": qkv[:, :q], "key": qkv[:, q:q + k], "value": qkv[:, q + k:]}


def _forward(layer: GPTNeoXCacheFlowAttention, step: dict[str, Any],
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    step = _qkv_step(step)
    kv = tuple(c.clone() for c in step["kv_cache"])
    out = layer(positions, step["query"], step["key"], step["value"], kv, step["metadata"])
    return out, kv[0], kv[1]


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Tokens of every rotary_embedding_with_cache call."""
    seen: list[int] = []
    original = cacheflow_kernels.rotary_embedding_with_cache

    def counted(positions: Any, *args: Any) -> None:
        seen.append(positions.shape[0])
        original(positions, *args)

    monkeypatch.setattr(cacheflow_kernels, "rotary_embedding_with_cache", counted)
    return seen


def test_cpu_tensors_keep_the_two_step_path(monkeypatch: pytest.MonkeyPatch,
                                            fused_calls: list[int]) -> None:
    monkeypatch.setenv("CACHEFLOW_ROTARY_CACHE", "1")
    layer = _layer()
    step = _step([1, 1, 3], [5, 17, 0], dtype=torch.float16)
    pos = _positions(step["metadata"])
    key_cache, value_cache = step["kv_cache"]
    assert not layer.rotary_emb.forward_with_cache(
        pos, step["query"].clone(), step["key"].clone(), step["value"], key_cache.clone(),
        value_cache.clone(), step["metadata"].slot_mapping)
    on = _forward(layer, step, pos)
    monkeypatch.setenv("CACHEFLOW_ROTARY_CACHE", "0")
    off = _forward(layer, step, pos)
    assert fused_calls == []
    for a, b in zip(on, off):  # the caches' unused slots are NaN
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


hopper_or_any_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_step(query_lens: list[int], cached: list[int], dtype: torch.dtype,
              **kwargs: Any) -> tuple[dict[str, Any], torch.Tensor]:
    step = _step(query_lens, cached, dtype=dtype, device="cuda", **kwargs)
    # NaN-filled caches would make equal outputs compare unequal: fill the unused slots.
    step["kv_cache"] = tuple(torch.nan_to_num(c.float(), nan=0.25).to(c.dtype)
                             for c in step["kv_cache"])
    return step, _positions(step["metadata"], "cuda")


@pytest.mark.gpu
@hopper_or_any_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("query_lens,cached", [([1] * 6, [3, 17, 64, 1, 0, 40]),
                                               ([5, 1, 12], [0, 9, 30])])
def test_fused_path_matches_the_two_kernels(monkeypatch: pytest.MonkeyPatch,
                                            fused_calls: list[int], dtype: torch.dtype,
                                            is_neox: bool, query_lens: list[int],
                                            cached: list[int]) -> None:
    # Decode steps of small grids would otherwise rotate and store inside the attention kernel
    # (test_attention_rotary_fusion.py covers that path), bypassing the kernel tested here.
    monkeypatch.setenv(ATTN_ROTARY_FUSE_ENV, "0")
    layer = _layer(is_neox=is_neox).cuda()
    step, pos = _gpu_step(query_lens, cached, dtype)
    monkeypatch.setenv("CACHEFLOW_ROTARY_CACHE", "0")
    want = _forward(layer, step, pos)
    assert fused_calls == []
    monkeypatch.delenv("CACHEFLOW_ROTARY_CACHE")  # the default
    got = _forward(layer, step, pos)
    assert fused_calls == [sum(query_lens)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.gpu
@hopper_or_any_gpu
def test_fp8_cache_fused_path_matches(monkeypatch: pytest.MonkeyPatch,
                                      fused_calls: list[int]) -> None:
    layer = _layer(num_heads=16, num_kv_heads=4, head_size=128).cuda()
    layer.set_kv_scale("k", 0.5)
    layer.set_kv_scale("v", 1.75)
    step, pos = _gpu_step([1, 1, 1, 4], [12, 50, 3, 0], torch.float16, num_heads=16,
                          num_kv_heads=4, head_size=128)
    step["kv_cache"] = tuple(c.to(torch.float8_e4m3fn) for c in step["kv_cache"])
    monkeypatch.setenv("CACHEFLOW_ROTARY_CACHE", "0")
    want = _forward(layer, step, pos)
    monkeypatch.delenv("CACHEFLOW_ROTARY_CACHE")
    got = _forward(layer, step, pos)
    assert fused_calls == [7]
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
@hopper_or_any_gpu
@pytest.mark.parametrize("kwargs", [{"rotary_dim": 32},
                                    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}])
def test_partial_or_dynamic_rotary_keeps_the_two_kernels(monkeypatch: pytest.MonkeyPatch,
                                                         fused_calls: list[int],
                                                         kwargs: dict[str, Any]) -> None:
    monkeypatch.setenv("CACHEFLOW_ROTARY_CACHE", "1")
    layer = _layer(**kwargs).cuda()
    step, pos = _gpu_step([1, 1], [4, 9], torch.float16)
    _forward(layer, step, pos)
    assert fused_calls == []
