"""``cacheflow bench latency``'s GPU idle measurement on CUDA: the profiled window holds the
asked number of decode steps' device work, the idle share is a fraction, and the engine is left
with nothing in flight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_serve import LLM
from cacheflow_serve.bench_gpu_busy import measure_gpu_busy

from serve_testutil import assert_idle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_idle_share_of_decode_steps(tiny_path: Path) -> None:
    llm = LLM(str(tiny_path), device="cuda", dtype="float16", kv_cache_blocks=512)
    prompts = [[5 + i] * (8 + i) for i in range(8)]
    result = measure_gpu_busy(llm.engine, prompts, steps=16)
    assert result["profiled_steps"] == 16
    assert 0.0 < result["busy_s"] <= result["window_s"]
    assert result["gpu_idle_fraction"] == pytest.approx(
        1.0 - result["busy_s"] / result["window_s"])
    # A tiny model's step is mostly host work: the GPU waits most of the window.
    assert result["gpu_idle_fraction"] > 0.2
    gaps = result["idle_gaps"]
    longest = gaps["longest_us"]
    assert 0 < len(longest) <= min(5, gaps["count"]) and longest == sorted(longest, reverse=True)
    idle_us = (result["window_s"] - result["busy_s"]) * 1e6
    assert sum(longest) <= idle_us * (1 + 1e-6)
    assert gaps["at_least_1ms_s"] * 1e6 <= idle_us * (1 + 1e-6)
    ops = result["gpu_top_ops"]
    assert 0 < len(ops) <= 40  # the 40 busiest kernels (bench_gpu_busy.top_device_ops)
    per_step = [op["ms_per_step"] for op in ops]
    assert per_step == sorted(per_step, reverse=True)
    assert per_step[0] > 0 and all(op["name"] and op["calls_per_step"] > 0 for op in ops)
    assert_idle(llm)
