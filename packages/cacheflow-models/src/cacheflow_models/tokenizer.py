"""Tokenizer loading from a checkpoint folder or a GGUF file (no network access)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from cacheflow_models.hf_config import split_gguf_path


def load_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer stored with the checkpoint (for GGUF: built from the file's metadata)."""
    folder, gguf_file = split_gguf_path(path)
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)
