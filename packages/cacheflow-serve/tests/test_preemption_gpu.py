"""Preemption on CUDA: swap mode moves blocks between the GPU cache and the pinned host cache
with cacheflow-kernels' swap_blocks, parallel sampling forks copy-on-write with copy_blocks, and
every output equals an unconstrained run on the same card (caches poisoned with NaN)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_preemption import (
    KV_BLOCKS,
    KV_BLOCKS_GROUPS,
    PARAMS,
    PROMPT_LENS,
    assert_same_outputs,
    count_swap_outs,
    make_poisoned_llm,
    preemption_prompts,
)

import cacheflow_kernels
from cacheflow_serve import LLM

from serve_testutil import assert_idle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_reference(tiny_path: Path) -> dict[str, Any]:
    llm = make_poisoned_llm(tiny_path, "cuda", kv_cache_blocks=1024)
    outputs = {name: llm.generate(preemption_prompts(), make(), use_tqdm=False)
               for name, make in PARAMS.items()}
    assert llm.engine.scheduler.num_preemptions == 0
    assert_idle(llm)
    return outputs


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"swap_blocks": 0, "copy_blocks": 0}
    for name in counts:
        original = getattr(cacheflow_kernels, name)

        def counted(*args: Any, _name: str = name, _fn: Callable[..., Any] = original) -> Any:
            counts[_name] += 1
            return _fn(*args)

        monkeypatch.setattr(cacheflow_kernels, name, counted)
    return counts


def _run(llm: LLM, kind: str) -> list[Any]:
    return llm.generate(preemption_prompts(), PARAMS[kind](), use_tqdm=False)


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_swap_preemption_on_cuda(kind: str, tiny_path: Path, gpu_reference: dict[str, Any],
                                 kernel_calls: dict[str, int]) -> None:
    llm = make_poisoned_llm(tiny_path, "cuda", kv_cache_blocks=KV_BLOCKS,
                            preemption_mode="swap")
    swapped = count_swap_outs(llm)
    outputs = _run(llm, kind)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [16] * len(PROMPT_LENS)
    assert_same_outputs(outputs, gpu_reference[kind])
    assert len(swapped) == llm.engine.scheduler.num_preemptions > 0
    assert kernel_calls["swap_blocks"] > 0
    assert_idle(llm)


def test_parallel_groups_swap_and_copy_on_write_on_cuda(
        tiny_path: Path, gpu_reference: dict[str, Any], kernel_calls: dict[str, int]) -> None:
    llm = make_poisoned_llm(tiny_path, "cuda", kv_cache_blocks=KV_BLOCKS_GROUPS,
                            preemption_mode="recompute")
    swapped = count_swap_outs(llm)
    outputs = _run(llm, "parallel")
    assert_same_outputs(outputs, gpu_reference["parallel"])
    assert len(swapped) == llm.engine.scheduler.num_preemptions > 0
    assert kernel_calls["swap_blocks"] > 0 and kernel_calls["copy_blocks"] > 0
    assert_idle(llm)
