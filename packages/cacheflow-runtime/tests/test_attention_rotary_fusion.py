"""Decode steps with the rotary embedding and the cache write inside the decode attention kernel
(``CACHEFLOW_ATTN_ROTARY_FUSE=1`` -> ``cuda_backend.decode_with_rotary_cache`` ->
``cacheflow_kernels.paged_attention_with_rotary_cache``): where it applies, and that the layer's
output and caches are those of the rotary + cache kernel followed by the attention kernel, bit
for bit. The CPU tests pin the switch and where it does not apply; the GPU ones (``gpu``
marker) compare the paths."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_attention_backends import _step
from test_rotary_cache import _forward, _gpu_step, _layer, _positions, hopper_or_any_gpu

import cacheflow_kernels
from cacheflow_runtime import kernels

ENV = "CACHEFLOW_ATTN_ROTARY_FUSE"


@pytest.fixture
def fused_attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What every paged_attention_with_rotary_cache call returned (True: it ran)."""
    seen: list[bool] = []
    original = cacheflow_kernels.paged_attention_with_rotary_cache

    def counted(*args: Any, **kwargs: Any) -> bool:
        ran = original(*args, **kwargs)
        seen.append(ran)
        return ran

    monkeypatch.setattr(cacheflow_kernels, "paged_attention_with_rotary_cache", counted)
    return seen


@pytest.mark.parametrize(("value", "sms", "seqs", "kv_heads", "on"), [
    ("1", 132, 64, 32, True),     # forced: any grid
    ("0", 132, 1, 32, False),     # never
    (None, 132, 1, 32, True),     # automatic: 32 CTAs on 132 SMs
    (None, 132, 4, 32, True),     # 128 CTAs
    (None, 132, 5, 32, False),    # 160 CTAs: more than one per SM
    (None, 78, 16, 8, False),     # 128 CTAs on 78 SMs
    ("true", 132, 16, 8, True),   # other values: automatic
])
def test_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, sms: int, seqs: int,
                kv_heads: int, on: bool) -> None:
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    monkeypatch.setattr(kernels, "_sm_count", lambda index: sms)
    cuda = torch.device("cuda", 0)  # only named: the SM count above is what is read
    assert kernels.attention_rotary_fusion_wanted(seqs, kv_heads, cuda) is on


@pytest.mark.parametrize(("heads", "head_size", "on"), [
    ((32, 1), 128, False),   # MQA of 32: the unfused kernel's wide CTAs of 16 heads
    ((24, 1), 96, False),
    ((17, 1), 64, False),
    ((16, 1), 128, True),    # one CTA of 16 heads either way
    ((40, 1), 128, True),    # above 32: 4-warp CTAs either way (the fused launch declines)
    ((32, 1), 256, True),    # head size 256: no wide CTAs
    ((32, 4), 128, True),    # GQA-8
])
def test_switch_leaves_groups_of_17_to_32_heads_to_wide_ctas(
        monkeypatch: pytest.MonkeyPatch, heads: tuple[int, int], head_size: int,
        on: bool) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(kernels, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert kernels.attention_rotary_fusion_wanted(4, heads[1], cuda, heads[0], head_size) is on
    monkeypatch.setenv(ENV, "1")
    assert kernels.attention_rotary_fusion_wanted(4, heads[1], cuda, heads[0], head_size)


def test_switch_keeps_cpu_steps_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert kernels.attention_rotary_fusion_wanted(1, 1, torch.device("cpu")) is False


def test_cpu_steps_keep_the_separate_kernels(monkeypatch: pytest.MonkeyPatch,
                                             fused_attention_calls: list[bool]) -> None:
    layer = _layer()
    step = _step([1, 1, 1], [5, 17, 0], dtype=torch.float16)
    pos = _positions(step["metadata"])
    monkeypatch.setenv(ENV, "1")
    on = _forward(layer, step, pos)
    monkeypatch.setenv(ENV, "0")
    off = _forward(layer, step, pos)
    assert fused_attention_calls == []
    for a, b in zip(on, off):  # the caches' unused slots are NaN
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _compare(monkeypatch: pytest.MonkeyPatch, layer: Any, step: dict[str, Any],
             pos: torch.Tensor) -> None:
    """The fused launch against the separate kernels, bit for bit. For 17-32 query heads per KV
    head the separate attention kernel runs with CTAs of 4 warps (CACHEFLOW_PA_WARPS=4): its
    wide CTAs of 16 heads differ from the fused launch's CTAs of 32 by rounding."""
    monkeypatch.setenv(ENV, "0")
    if 16 < layer.num_heads // layer.num_kv_heads <= 32:
        monkeypatch.setenv("CACHEFLOW_PA_WARPS", "4")
    want = _forward(layer, step, pos)
    monkeypatch.delenv("CACHEFLOW_PA_WARPS", raising=False)
    monkeypatch.setenv(ENV, "1")
    got = _forward(layer, step, pos)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
@hopper_or_any_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(("heads", "head_size"), [((8, 2), 64), ((32, 1), 128), ((4, 4), 256),
                                                  ((16, 16), 128)])
def test_fused_decode_matches_the_separate_kernels(
        monkeypatch: pytest.MonkeyPatch, fused_attention_calls: list[bool], dtype: torch.dtype,
        is_neox: bool, heads: tuple[int, int], head_size: int) -> None:
    num_heads, num_kv_heads = heads
    layer = _layer(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                   is_neox=is_neox).cuda()
    cached = [3, 17, 64, 1, 0, 40, 200]
    step, pos = _gpu_step([1] * len(cached), cached, dtype, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, head_size=head_size)
    _compare(monkeypatch, layer, step, pos)
    assert fused_attention_calls == [True]


@pytest.mark.gpu
@hopper_or_any_gpu
def test_fp8_cache_fused_decode_matches(monkeypatch: pytest.MonkeyPatch,
                                        fused_attention_calls: list[bool]) -> None:
    layer = _layer(num_heads=16, num_kv_heads=4, head_size=128).cuda()
    layer.set_kv_scale("k", 0.5)
    layer.set_kv_scale("v", 1.75)
    step, pos = _gpu_step([1, 1, 1, 1], [12, 50, 3, 0], torch.float16, num_heads=16,
                          num_kv_heads=4, head_size=128)
    step["kv_cache"] = tuple(c.to(torch.float8_e4m3fn) for c in step["kv_cache"])
    _compare(monkeypatch, layer, step, pos)
    assert fused_attention_calls == [True]


@pytest.mark.gpu
@hopper_or_any_gpu
@pytest.mark.parametrize(("query_lens", "cached", "heads", "calls"), [
    ([5, 1, 12], [0, 9, 30], (8, 2), []),       # a prefill step: not a decode
    ([1], [30000], (8, 2), [True]),             # one long context: a split launch
    ([1, 1], [4, 9], (64, 1), [False]),         # 64 query heads per KV head: two CTAs
])
def test_steps_outside_the_common_case_stay_correct(
        monkeypatch: pytest.MonkeyPatch, fused_attention_calls: list[bool],
        query_lens: list[int], cached: list[int], heads: tuple[int, int],
        calls: list[bool]) -> None:
    layer = _layer(num_heads=heads[0], num_kv_heads=heads[1], head_size=128).cuda()
    step, pos = _gpu_step(query_lens, cached, torch.float16, num_heads=heads[0],
                          num_kv_heads=heads[1], head_size=128)
    _compare(monkeypatch, layer, step, pos)
    assert fused_attention_calls == calls
