"""Shared fixtures of the cacheflow-models tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def prompt_batch() -> list[list[int]]:
    """Token-id prompts of different lengths (1 to 40 tokens, crossing block boundaries)."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 259, (n,), generator=gen).tolist() for n in (1, 7, 16, 17, 40)]
