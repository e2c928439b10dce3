"""Tokenizer loading from a checkpoint folder or a GGUF file (no network access)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from cacheflow_models.hf_config import gguf_file_of, split_gguf_path

# GGUF files whose tokenizer AutoTokenizer builds as a plain TokenizersBackend (byte-level BPE
# vocabularies of these architectures). For them the backend is built directly: AutoTokenizer
# would first derive the model config through transformers' slow GGUF reader just to pick that
# class. Other GGUF files go through AutoTokenizer.
_BACKEND_GGUF = {("llama", "gpt2"), ("qwen2", "gpt2")}


def load_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer stored with the checkpoint (for GGUF: built from the file's metadata)."""
    folder, gguf_file = split_gguf_path(path)
    if gguf_file is not None:
        backend = _tokenizers_backend()
        meta = gguf_file_of(folder / gguf_file).metadata
        kind = (meta.get("general.architecture"), meta.get("tokenizer.ggml.model"))
        if backend is not None and kind in _BACKEND_GGUF:
            return backend.from_pretrained(str(folder), gguf_file=gguf_file,
                                           local_files_only=True)
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)


def _tokenizers_backend() -> Any:
    """transformers 5's TokenizersBackend class, None with transformers 4."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    return TokenizersBackend
