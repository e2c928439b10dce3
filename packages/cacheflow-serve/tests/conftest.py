"""Shared fixtures of the cacheflow-serve tests: a tiny random LLaMA checkpoint and an LLM on it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cacheflow_models import TOKENIZER_FILES
from cacheflow_models.testing import save_tiny_checkpoint, tiny_llama_config
from cacheflow_serve import LLM

from serve_testutil import CHAT_TEMPLATE


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random LLaMA (GQA, vocabulary of 259 byte tokens, 256 positions)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", tiny_llama_config())


@pytest.fixture(scope="session")
def chat_tiny_path(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint with ``CHAT_TEMPLATE`` saved in its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_chat") / "llama"
    shutil.copytree(tiny_path, path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def no_tokenizer_path(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint without its tokenizer files."""
    path = tmp_path_factory.mktemp("no_tokenizer") / "llama"
    shutil.copytree(tiny_path, path)
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        (path / name).unlink(missing_ok=True)
    return path


@pytest.fixture(scope="session")
def llm(tiny_path: Path) -> LLM:
    """One LLM with the default settings, shared by the tests that leave it idle afterwards."""
    return LLM(tiny_path, device="cpu", dtype="float32")



@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Runs torch on one thread in the modules that set ``ONE_TORCH_THREAD = True``.

    The tiny model's ops are too small to gain from more threads, and on a busy 2-core machine
    spinning OpenMP workers make them ten times slower or worse.
    """
    if not getattr(request.module, "ONE_TORCH_THREAD", False):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
