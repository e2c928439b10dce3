"""The emulated kernels' shared libraries, each compiled once per test session in the background.

Each emulated test module lists its builds in ``EMULATOR_BUILDS`` (the source under
``emulation/`` and its ``-D`` options). As collection ends, conftest.py starts every build that
the selected tests need, at most one compiler per CPU core at a time, so that the builds (a
minute or more each at -O2) run beside the tests that need none, and a module's fixture waits
only for its own library (``library``). A build no selected test needs never starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "csrc"
EMULATION = HERE / "emulation"

#: A build: the source file under emulation/, then its -D options.
Build = tuple[str, ...]
BuildResult = tuple[Path, subprocess.CompletedProcess]

_lock = threading.Lock()
_builds: dict[Build, Future[BuildResult]] = {}
_running: set[subprocess.Popen] = set()
_pool: Optional[ThreadPoolExecutor] = None
_folder: Optional[Path] = None


def _compiler() -> Optional[str]:
    return shutil.which("g++") or shutil.which("c++")


def _compile(cmd: list[str], lib: Path) -> BuildResult:
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        with _lock:
            _running.add(proc)
        try:
            out, err = proc.communicate(timeout=900)
        finally:
            with _lock:
                _running.discard(proc)
    return lib, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start(build: Build) -> Optional[Future[BuildResult]]:
    """Starts compiling ``build`` unless it has started already; None without a C++ compiler."""
    global _pool, _folder
    cxx = _compiler()
    if cxx is None:
        return None
    with _lock:
        if build not in _builds:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                           thread_name_prefix="emulator-build")
                _folder = Path(tempfile.mkdtemp(prefix="cacheflow_emu_"))
            assert _folder is not None
            source, *defines = build
            lib = _folder / f"lib{len(_builds)}_{Path(source).stem}.so"
            cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas",
                   *defines, f"-I{CSRC}", f"-I{EMULATION}", str(EMULATION / source), "-o",
                   str(lib)]
            _builds[build] = _pool.submit(_compile, cmd, lib)
        return _builds[build]


def library(build: Build) -> Path:
    """The compiled library of ``build`` (started now if it was not): skips the test without a
    C++ compiler or one without ``_Float16``; fails with the compiler's errors otherwise."""
    future = start(build)
    if future is None:
        pytest.skip("no C++ compiler")
    lib, result = future.result()
    if result.returncode != 0 and "_Float16" in result.stderr:
        pytest.skip("the C++ compiler lacks _Float16")
    assert result.returncode == 0, result.stderr[-4000:]
    return lib


def stop() -> None:
    """Ends the session's builds: queued ones are dropped, running compilers killed, the
    libraries' folder removed."""
    global _pool, _folder
    with _lock:
        pool, folder, _pool, _folder = _pool, _folder, None, None
        for proc in _running:
            proc.kill()
        _builds.clear()
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
