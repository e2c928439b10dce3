"""The sanitizer sweep (sanitizer_sweep.py) on a CUDA device: plain, and under compute-sanitizer's
memcheck (skipped without CUDA; the memcheck test also needs compute-sanitizer on the machine)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

SWEEP = Path(__file__).resolve().parent / "sanitizer_sweep.py"


def _compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "compute-sanitizer").is_file():
            return str(Path(root) / "bin" / "compute-sanitizer")
    return None


def test_sweep_outputs_match_references() -> None:
    import sanitizer_sweep

    assert sanitizer_sweep.main([]) == 0


@pytest.mark.slow
def test_sweep_is_memcheck_clean() -> None:
    tool = _compute_sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer is not installed on this machine")
    proc = subprocess.run(
        [tool, "--tool", "memcheck", "--leak-check", "no", "--error-exitcode", "99",
         sys.executable, str(SWEEP), "--only", "paged_attention,paged_prefill,cache_ops,fp8"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-4000:]
    assert re.search(r"ERROR SUMMARY: 0 errors", report), report[-4000:]
    assert "all outputs match their references" in report
