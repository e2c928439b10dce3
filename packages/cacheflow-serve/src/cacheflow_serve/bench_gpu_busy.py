"""How much of a decode step the GPU spends working, for ``cacheflow bench latency``.

``B`` requests are added to the engine and stepped until every prompt has been computed (every
request has its first token); a few more steps warm up, then ``steps`` engine steps of pure
decoding run under ``torch.profiler`` with only CUDA activity recorded (no host-side op
records, which would slow the host and inflate the idle share). The GPU is busy while any
kernel, copy or memset runs; busy time is the union of those intervals, and the window runs
from the first one's start to the last one's end, so the idle share counts the gaps between
and inside steps where the GPU waits for the host. The requests are aborted afterwards.
``idle_gaps`` says whether the idle time is one stall or many short waits.
"""

from __future__ import annotations

from typing import Any

_WARMUP_STEPS = 3


def idle_gaps(intervals: list[tuple[float, float]]) -> list[float]:
    """The lengths of the gaps between the union of ``(start, end)`` intervals, longest first
    (same unit as the intervals): where the device waited, inside the window they span."""
    ordered = sorted(intervals)
    gaps: list[float] = []
    end = ordered[0][1] if ordered else 0.0
    for lo, hi in ordered[1:]:
        if lo > end:
            gaps.append(lo - end)
        end = max(end, hi)
    return sorted(gaps, reverse=True)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (any unit in, same unit out): the
    window they span less its :func:`idle_gaps`."""
    if not intervals:
        return 0.0
    window = max(hi for _, hi in intervals) - min(lo for lo, _ in intervals)
    return window - sum(idle_gaps(intervals))


def device_intervals(events: Any) -> list[tuple[float, float]]:
    """The ``(start, end)`` microseconds of the device activities among profiler ``events``."""
    from torch.autograd import DeviceType

    return [(e.time_range.start, e.time_range.end) for e in events
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]


def top_device_ops(events: Any, steps: int, k: int = 8) -> list[dict[str, Any]]:
    """The ``k`` device activities (kernels, copies, memsets, by name) with the most device time
    among profiler ``events``, each as ``{"name", "ms_per_step", "calls_per_step"}``."""
    from torch.autograd import DeviceType

    totals: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start:
            entry = totals.setdefault(e.name, [0.0, 0.0])
            entry[0] += e.time_range.end - e.time_range.start
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:k]
    return [{"name": name, "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
            for name, (us, n) in ranked]


def measure_gpu_busy(engine: Any, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    """Profiles ``steps`` pure decode steps of ``prompts`` run as one batch on ``engine`` (an
    ``LLMEngine`` on a CUDA device); returns the window, the busy time and the idle share.

    ``gpu_top_ops`` lists where the busy time goes (:func:`top_device_ops`).

    Raises:
        RuntimeError: no CUDA device, a request finished before the window ended (the caller's
            ``steps`` must leave room), or the profiler recorded no device activity.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cacheflow_runtime import SamplingParams
    from cacheflow_serve.bench_common import allocator_counters
    from cacheflow_serve.llm import full_gc_paused

    if not torch.cuda.is_available():
        raise RuntimeError("measuring the GPU's idle share needs a CUDA device")
    # No max_tokens: with chunked prefill the first requests decode for many steps before the
    # last prompt is in, and none may finish inside the window (only the model's length does).
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    ids = [f"gpu-busy-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, None, params, prompt)
    try:
        started: set[str] = set()
        while len(started) < len(ids):
            if not engine.has_unfinished_requests():
                raise RuntimeError("the requests finished before every prompt was computed")
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        for _ in range(_WARMUP_STEPS):
            engine.step()
        # As in LLM.generate: a full collector pass inside the window would stall the GPU for
        # hundreds of milliseconds and count as the engine's idle time.
        allocator_before = allocator_counters(torch.device("cuda"))
        with full_gc_paused(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                finished = [o for o in engine.step() if o.finished]
                if finished:
                    raise RuntimeError(
                        f"{len(finished)} requests finished inside the profiled decode steps "
                        f"(first: {len(finished[0].outputs[0].token_ids)} tokens, "
                        f"{finished[0].outputs[0].finish_reason}); the model's length is too "
                        "short for the window")
        allocator_after = allocator_counters(torch.device("cuda"))
        events = prof.events()
        intervals = device_intervals(events)
    finally:
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()
    if not intervals:
        raise RuntimeError("the profiler recorded no device activity (is the engine on CUDA?)")
    window_us = max(hi for _, hi in intervals) - min(lo for lo, _ in intervals)
    gaps_us = idle_gaps(intervals)
    busy_us = window_us - sum(gaps_us)  # the union of the intervals (union_seconds)
    return {"profiled_steps": steps, "window_s": window_us / 1e6, "busy_s": busy_us / 1e6,
            "gpu_idle_fraction": 1.0 - busy_us / window_us,
            # One long stall and many short waits call for different fixes.
            "idle_gaps": {"count": len(gaps_us), "longest_us": [round(g, 1) for g in gaps_us[:5]],
                          "at_least_1ms_s": sum(g for g in gaps_us if g >= 1000.0) / 1e6},
            "cuda_allocator_in_window": {k: allocator_after[k] - allocator_before[k]
                                         for k in allocator_before},
            "gpu_top_ops": top_device_ops(events, steps, k=40)}
