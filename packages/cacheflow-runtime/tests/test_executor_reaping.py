"""No worker process outlives its driver: Ctrl-C of the terminal's process group and the end of
the driver's script (the driver's finalizer reaps, whatever the import order), and SIGTERM /
SIGKILL of the driver alone (the workers' watchdog exits)."""

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
import signal, sys, time
if sys.argv[2] == "finalizer-first":
    import tempfile
    # A weakref.finalize made before torch imports multiprocessing.util: weakref's exit hook
    # is then registered first, and runs after multiprocessing's (atexit is LIFO).
    scratch = tempfile.TemporaryDirectory()
from engine_testutil import CharTokenizer, model_config
from cacheflow_runtime import CacheConfig, LLMEngine, ParallelConfig, SchedulerConfig

if __name__ == "__main__":
    # What a terminal's foreground job has; a test run started as a background job of a
    # non-interactive shell would pass SIGINT on ignored, and Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    engine = LLMEngine(model_config(sys.argv[1]),
                       CacheConfig(block_size=8, num_device_blocks=8, num_cpu_blocks=2),
                       SchedulerConfig(max_model_len=64), CharTokenizer(), "cpu",
                       parallel_config=ParallelConfig(2, "mp"))
    print(" ".join(str(p.pid) for p in engine.executor.processes), flush=True)
    if sys.argv[3] == "exit":
        sys.stdin.readline()  # then the script ends, without engine.shutdown()
    else:
        while True:
            time.sleep(0.1)
"""
# Reaping is prompt (the watchdog polls every 0.5 s); the bound leaves a busy CI machine slack.
REAP_DEADLINE_S = 30.0


def _signal_state(pid: int) -> str:
    """The signal lines of ``/proc/<pid>/status`` (pending, blocked, ignored, caught)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "(gone)"
    return " ".join(line.replace("\t", "") for line in status.splitlines()
                    if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))


@pytest.mark.parametrize("how, order", [
    ("ctrl-c", "default"), ("sigterm", "default"), ("sigkill", "default"),
    ("ctrl-c", "finalizer-first"), ("exit", "finalizer-first"),
], ids=["ctrl-c", "sigterm", "sigkill", "ctrl-c-finalizer-first", "exit-finalizer-first"])
def test_workers_do_not_outlive_the_driver(tmp_path: Path, how: str, order: str) -> None:
    path = write_checkpoint(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "driver.stderr"
    with open(log, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(path), order, how],
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, start_new_session=True)
    try:
        assert driver.stdin is not None and driver.stdout is not None
        workers = [int(p) for p in driver.stdout.readline().split()]
        assert len(workers) == 2 and all(process_alive(p) for p in workers), log.read_text()
        # the workers, and multiprocessing's resource tracker
        children = child_pids(driver.pid)
        assert set(workers) <= children
        if how == "ctrl-c":
            os.killpg(driver.pid, signal.SIGINT)  # the whole group, as a terminal does
        elif how == "exit":
            driver.stdin.close()
        else:
            driver.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        try:
            code = driver.wait(REAP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver did not exit within {REAP_DEADLINE_S:.0f} s ({how}); its "
                        f"signals: {_signal_state(driver.pid)}; its stderr:\n{log.read_text()}")
        if how == "exit":
            assert code == 0, log.read_text()
        deadline = time.monotonic() + REAP_DEADLINE_S
        while any(process_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if process_alive(p)]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pipe in (driver.stdin, driver.stdout):
            if pipe is not None:
                pipe.close()
        sys.stderr.write(log.read_text())  # shown with a failure


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
