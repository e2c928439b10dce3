"""GPU time of a kernel call without the host: CUDA-graph replays timed with CUDA events.

Eager back-to-back calls measure whichever is slower, the GPU or the host that launches the
calls (Python argument checks, the FFI call, the launch itself), so a kernel shorter than its
host path shows up at host speed. The benchmarks report both: this module's graph time, which
is the kernel's own and what the bandwidth targets are judged on, and the eager time.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from typing import Any


def time_graph_us(torch: Any, calls: list[Callable[[], Any]], *, calls_per_graph: int = 20,
                  replays: int = 15, warmup: int = 3, warm_ms: float = 25.0) -> float:
    """Median microseconds per call: ``calls_per_graph`` calls (call k runs
    ``calls[k % len(calls)]``, so calls can rotate over buffer sets larger than L2) are captured
    in one CUDA graph, which is replayed ``replays`` times back to back between CUDA events,
    after replays for at least ``warm_ms`` (a GPU that idled while the host built the inputs
    runs its first milliseconds slower: without them the first of two timings of the same
    15-us kernel in one process came out 5% slower on an H100, 2026-12-05).

    The calls must be capturable: no host synchronization, no allocation outside torch's
    caching allocator.
    """
    n = len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's capture docs ask
        for i in range(max(warmup, n)):
            calls[i % n]()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(calls_per_graph):
            calls[k % n]()
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    graph.replay()
    last.record()
    torch.cuda.synchronize()
    for _ in range(math.ceil(warm_ms / max(first.elapsed_time(last), 1e-3))):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    per_call = [s.elapsed_time(e) * 1000.0 / calls_per_graph for s, e in zip(starts, ends)]
    del graph
    return statistics.median(per_call)


def time_eager_us(torch: Any, fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Median microseconds of ``fn()`` launched eagerly, between CUDA events on the current
    stream, over ``reps`` calls after ``warmup``. For work that cannot be captured into a graph
    (e.g. on streams of green contexts); ``fn`` may fork and join other streams."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def copy_bandwidth(torch: Any, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Bytes per second (read plus written) of a device-to-device copy of ``nbytes``, the
    benchmarks' memory floor: the median of ``iters`` eager copies, each between CUDA events.

    Not a graph replay: inside a CUDA graph the copy becomes a memcpy node, which the H200 ran at
    2.7 TB/s against 4.2 TB/s for the same copy launched eagerly (2026-12-03). A 1 GiB copy is
    long enough that launching it costs nothing.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    seconds = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(seconds)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Sets the environment variables ``env`` for the duration of the block (the kernels read
    their CACHEFLOW_* switches at every call), then restores each to its previous value or
    absence."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cuda_torch(min_capability: tuple[int, int] = (0, 0)) -> Any | None:
    """torch, when it is installed and sees a CUDA device of compute capability at least
    ``min_capability``; otherwise None, after saying on stderr why nothing is measured."""
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing measured", file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured", file=sys.stderr)
        return None
    if torch.cuda.get_device_capability() < min_capability:
        major, minor = min_capability
        print(f"needs compute capability {major}.{minor}+: nothing measured", file=sys.stderr)
        return None
    return torch
