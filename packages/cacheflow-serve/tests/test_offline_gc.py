"""Offline generation starts no automatic full collector pass while it runs and gives the
thresholds back afterwards (llm.py, ``full_gc_paused``), whatever is frozen."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from cacheflow_serve import LLM, SamplingParams


def _full_pass_thresholds_per_step(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    thresholds: list[int] = []
    step = llm.engine.step

    def recording_step(*args, **kwargs):
        thresholds.append(gc.get_threshold()[2])
        return step(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "step", recording_step)
    return thresholds


def test_generate_pauses_full_passes_only_while_it_runs(
        tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(str(tiny_path), device="cpu", kv_cache_blocks=64)
    seen = _full_pass_thresholds_per_step(llm, monkeypatch)
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)
    assert len(out[0].outputs[0].token_ids) == 3
    assert len(seen) >= 3 and min(seen) >= 1 << 30  # no automatic full pass during a step
    assert gc.get_threshold() == thresholds  # given back
    assert gc.get_freeze_count() == frozen  # nothing frozen or unfrozen


def test_full_passes_pause_with_objects_already_frozen(
        tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An application's freeze (or Python 3.12's own frozen objects at start) neither turns the
    pause off nor is undone by it."""
    llm = LLM(str(tiny_path), device="cpu", kv_cache_blocks=64)
    seen = _full_pass_thresholds_per_step(llm, monkeypatch)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)
        assert seen and min(seen) >= 1 << 30
        # still the application's freeze (objects freed by reference counting may leave it)
        assert gc.get_freeze_count() > frozen // 2
    finally:
        gc.unfreeze()


def test_construction_ends_with_a_collection(tiny_path: Path) -> None:
    """What loading left behind is collected once at the end of ``LLM(...)``, so the survivors
    sit in the oldest generation and the first young-generation pass of a run (inside a step)
    does not walk them: no young-generation pass has happened since (counts of 0)."""
    LLM(str(tiny_path), device="cpu", kv_cache_blocks=64)
    young, middle, _ = gc.get_count()
    assert (middle, gc.get_count()[2]) == (0, 0) and young < 700
