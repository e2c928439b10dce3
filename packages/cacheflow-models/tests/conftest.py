"""Shared fixtures of the cacheflow-models tests."""

from __future__ import annotations

import pytest

from cacheflow_models.testing import prompt_batch as _prompt_batch


@pytest.fixture(scope="session")
def prompt_batch() -> list[list[int]]:
    """Token-id prompts of different lengths (1 to 40 tokens, crossing block boundaries)."""
    return _prompt_batch()
