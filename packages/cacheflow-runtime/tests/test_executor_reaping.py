"""No worker process outlives its driver: Ctrl-C of the terminal's process group (the driver's
finalizer reaps), and SIGTERM / SIGKILL of the driver alone (the workers' watchdog exits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_testutil import child_pids, process_alive
from engine_testutil import write_checkpoint

DRIVER = """
import sys, time
from engine_testutil import CharTokenizer, model_config
from cacheflow_runtime import CacheConfig, LLMEngine, ParallelConfig, SchedulerConfig

if __name__ == "__main__":
    engine = LLMEngine(model_config(sys.argv[1]),
                       CacheConfig(block_size=8, num_device_blocks=8, num_cpu_blocks=2),
                       SchedulerConfig(max_model_len=64), CharTokenizer(), "cpu",
                       parallel_config=ParallelConfig(2, "mp"))
    print(" ".join(str(p.pid) for p in engine.executor.processes), flush=True)
    while True:
        time.sleep(0.1)
"""
# Reaping is prompt (the watchdog polls every 0.5 s); the bound leaves a busy CI machine slack.
REAP_DEADLINE_S = 30.0


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_workers_do_not_outlive_the_driver(tmp_path: Path, how: str) -> None:
    path = write_checkpoint(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(path)], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert driver.stdout is not None
        workers = [int(p) for p in driver.stdout.readline().split()]
        assert len(workers) == 2 and all(process_alive(p) for p in workers)
        # the workers, and multiprocessing's resource tracker
        children = child_pids(driver.pid)
        assert set(workers) <= children
        if how == "ctrl-c":
            os.killpg(driver.pid, signal.SIGINT)  # the whole group, as a terminal does
        else:
            driver.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        driver.wait(REAP_DEADLINE_S)
        deadline = time.monotonic() + REAP_DEADLINE_S
        while any(process_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if process_alive(p)]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def test_reaping_skips_workers_that_never_started() -> None:
    """Starting the second worker failed (say, a script without a ``__main__`` guard): the
    finalizer stops the first and drops the second, without an error of its own at exit."""
    import multiprocessing

    from cacheflow_runtime.executor.multiproc import _reap

    ctx = multiprocessing.get_context("spawn")
    started = ctx.Process(target=time.sleep, args=(60,), daemon=True)
    never = ctx.Process(target=time.sleep, args=(60,), daemon=True)
    pipes = [ctx.Pipe(), ctx.Pipe()]
    started.start()
    _reap([started, never], [parent for parent, _ in pipes], timeout=0.5)
    assert not started.is_alive() and never.pid is None
