"""Offline generation keeps the heap that existed before the run out of the collector's full
passes while it runs and starts no automatic full pass, and hands both back afterwards
(llm.py, ``frozen_heap``)."""

from __future__ import annotations

import gc
from pathlib import Path

from cacheflow_serve import LLM, SamplingParams


def test_generate_freezes_the_heap_only_while_it_runs(tiny_path: Path, monkeypatch) -> None:
    llm = LLM(str(tiny_path), device="cpu", kv_cache_blocks=64)
    seen: list[int] = []
    full_pass_thresholds: list[int] = []
    step = llm.engine.step

    def counting_step(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        full_pass_thresholds.append(gc.get_threshold()[2])
        return step(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "step", counting_step)
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)
    assert len(out[0].outputs[0].token_ids) == 3
    assert seen and min(seen) > 0  # frozen during every step
    assert min(full_pass_thresholds) >= 1 << 30  # no automatic full pass during a step
    assert gc.get_freeze_count() == 0  # and given back
    assert gc.get_threshold() == thresholds


def test_an_application_freeze_is_left_alone(tiny_path: Path) -> None:
    llm = LLM(str(tiny_path), device="cpu", kv_cache_blocks=64)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)
        # still the application's freeze (objects freed by reference counting may leave it)
        assert gc.get_freeze_count() > frozen // 2
    finally:
        gc.unfreeze()
