"""Tokenizer loading from a checkpoint folder or a GGUF file (no network access), and the
stand-in the engine gets when the tokenizer is skipped (token ids in, token ids out)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from transformers import AutoTokenizer

from cacheflow_models.hf_config import gguf_file_of, split_gguf_path
from cacheflow_runtime.errors import CheckpointError, InvalidRequestError

#: Files that hold a Hugging Face tokenizer (any one of them is enough for transformers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "spiece.model")

_HOW_TO_PROCEED = ("pass tokenizer=<folder or .gguf file with the tokenizer> (--tokenizer), or "
                   "skip_tokenizer_init=True (cacheflow serve --skip-tokenizer-init) to send and "
                   "receive token ids only")

# GGUF files whose tokenizer AutoTokenizer builds as a plain TokenizersBackend (byte-level BPE
# vocabularies of these architectures). For them the backend is built directly: AutoTokenizer
# would first derive the model config through transformers' slow GGUF reader just to pick that
# class. Other GGUF files go through AutoTokenizer.
_BACKEND_GGUF = {("llama", "gpt2"), ("qwen2", "gpt2")}


def load_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer stored at ``path``: a checkpoint or tokenizer folder, or a GGUF file
    (built from its metadata).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: no tokenizer is there (the message lists the files looked for and how
            to proceed), or its files cannot be read.
    """
    folder, gguf_file = split_gguf_path(path, "tokenizer path")
    if gguf_file is None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {folder}: looked for "
                              f"{', '.join(TOKENIZER_FILES)}; {_HOW_TO_PROCEED}", file=folder)
    where = folder / gguf_file if gguf_file else folder
    try:
        tokenizer = _from_pretrained(folder, gguf_file)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, struct.error
        reason = str(exc).strip() or type(exc).__name__
        raise CheckpointError(f"cannot load the tokenizer from {where}: {reason}; "
                              f"{_HOW_TO_PROCEED}", file=where) from exc
    if tokenizer is None or isinstance(tokenizer, bool):  # transformers' way of saying "none"
        raise CheckpointError(f"no tokenizer could be built from {where}; {_HOW_TO_PROCEED}",
                              file=where)
    return tokenizer


class TokenIdsOnly:
    """What the engine gets instead of a tokenizer with ``skip_tokenizer_init``: prompts must be
    token ids and outputs carry token ids with empty text (the detokenizer calls below give
    empty strings). ``encode`` refuses text."""

    def encode(self, text: str, **_: Any) -> list[int]:
        """Refuses: there is no tokenizer to encode text with."""
        raise InvalidRequestError("the tokenizer was skipped (skip_tokenizer_init): give the "
                                  "prompt as token ids", param="prompt")

    def decode(self, token_ids: Sequence[int], **_: Any) -> str:
        """Empty text for any token ids."""
        return ""

    def convert_ids_to_tokens(self, token_ids: Sequence[int], **_: Any) -> list[str]:
        """One empty token string per id."""
        return [""] * len(token_ids)

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Empty text."""
        return ""


def has_tokenizer(tokenizer: Any) -> bool:
    """False for the ``TokenIdsOnly`` stand-in (or None), True for a real tokenizer."""
    return tokenizer is not None and not isinstance(tokenizer, TokenIdsOnly)


def _from_pretrained(folder: Path, gguf_file: Optional[str]) -> Any:
    """AutoTokenizer, or for the GGUF vocabularies of ``_BACKEND_GGUF`` the tokenizers backend
    built directly from the already parsed file."""
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
