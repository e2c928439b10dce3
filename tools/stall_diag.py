"""Finds host stalls inside engine steps: runs any `cacheflow` command (e.g. `bench throughput`)
with two probes, and logs what they see to LOG.

    python tools/stall_diag.py LOG bench throughput --model /tmp/llama7b --num-prompts 1000 ...

- every pass of Python's cyclic garbage collector longer than 10 ms: its generation, duration
  and number of objects collected;
- every `LLMEngine.step` longer than --threshold-ms (default 120): its duration, plus the
  Python stack of every thread at the moment the step crossed the threshold (faulthandler), so a
  stall in a C call shows the Python line that made it.

This is how the one 200-300 ms stall of every 7B run on the H200 was traced to a full collector
pass (docs/benchmarks.md, 2026-12-03 15:54).
"""

from __future__ import annotations

import faulthandler
import gc
import sys
import time
from typing import Any, TextIO


def install(log: TextIO, threshold_s: float) -> Any:
    """Hooks the collector's callbacks and ``LLMEngine.step``; both write to ``log``. Returns
    the collector callback (remove it from ``gc.callbacks`` before closing ``log``)."""
    from cacheflow_runtime.engine.llm_engine import LLMEngine

    started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
            return
        took = time.perf_counter() - (started[0] if started else time.perf_counter())
        if took > 0.01:
            log.write(f"gc generation {info['generation']}: {took * 1e3:.1f} ms, "
                      f"collected {info['collected']}\n")
            log.flush()

    gc.callbacks.append(on_gc)
    step = LLMEngine.step

    def timed_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        faulthandler.dump_traceback_later(threshold_s, file=log)
        start = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            faulthandler.cancel_dump_traceback_later()
            took = time.perf_counter() - start
            if took > threshold_s:
                log.write(f"step took {took * 1e3:.1f} ms\n")
                log.flush()

    LLMEngine.step = timed_step  # type: ignore[method-assign]
    return on_gc


def main(argv: list[str]) -> int:
    """``LOG [--threshold-ms MS] <cacheflow arguments>``."""
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    path, rest = argv[0], argv[1:]
    threshold_ms = 120.0
    if rest[:1] == ["--threshold-ms"] and len(rest) > 1:
        threshold_ms, rest = float(rest[1]), rest[2:]
    from cacheflow_serve.cli import main as cacheflow_main

    with open(path, "w") as log:
        on_gc = install(log, threshold_ms / 1e3)
        try:
            return int(cacheflow_main(rest) or 0)
        finally:
            gc.callbacks.remove(on_gc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
