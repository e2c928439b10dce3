"""Fixtures shared by the runtime's engine tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_testutil import write_checkpoint


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests: the tiny model's ops gain nothing from threads,
    and on a busy 2-core machine spinning OpenMP workers slow them down many times."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime's tiny decoder checkpoint (engine_testutil.write_checkpoint)."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
