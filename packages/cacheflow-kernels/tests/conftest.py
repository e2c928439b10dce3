"""Fixtures and the skip rule for ``@pytest.mark.gpu`` tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import emulator_builds
import pytest

from kernels_testutil import make_args
from moe_testutil import VARIANTS


def _gpu_ready() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "torch.cuda is not available"
    # With CUDA present a missing library is a failure, not a skip.
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this package's ``gpu``-marked tests when torch reports no CUDA device."""
    here = Path(__file__).resolve().parent
    items = [
        i for i in items if "gpu" in i.keywords and here in Path(str(i.path)).resolve().parents
    ]
    if not items:
        return
    ready, why = _gpu_ready()
    if ready:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {why}")
    for item in items:
        item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts the emulator builds (``EMULATOR_BUILDS`` of each module) the selected tests need,
    so that they compile beside the tests that run first."""
    modules = {id(item.module): item.module for item in session.items
               if getattr(item, "module", None) is not None}
    for module in modules.values():
        for build in getattr(module, "EMULATOR_BUILDS", ()):
            emulator_builds.start(build)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Kills the emulator builds still running (a session stopped early) and removes their
    libraries."""
    emulator_builds.stop()


@pytest.fixture
def cpu_args() -> dict[str, Any]:
    """A valid float16 argument set on the CPU (valid except for the device)."""
    return make_args()


@pytest.fixture(params=VARIANTS)
def moe_gemm_variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each grouped-GEMM kernel choice in turn, through ``CACHEFLOW_MOE_GEMM``."""
    monkeypatch.setenv("CACHEFLOW_MOE_GEMM", request.param)
    return str(request.param)
