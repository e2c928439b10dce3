"""Fixtures and the skip rule for ``@pytest.mark.gpu`` tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


@pytest.fixture
def cpu_args() -> dict[str, Any]:
    """A valid float16 argument set on the CPU (valid except for the device)."""
    return make_args()


@pytest.fixture(params=VARIANTS)
def moe_gemm_variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each grouped-GEMM kernel choice in turn, through ``CACHEFLOW_MOE_GEMM``."""
    monkeypatch.setenv("CACHEFLOW_MOE_GEMM", request.param)
    return str(request.param)
