"""The errors cacheflow raises for what a user gave it: one ``ValueError`` subclass per kind.

- :class:`InvalidArgumentError`: an argument of ``LLM(...)``, ``SamplingParams(...)``, a config
  or a command-line option is of the wrong type or out of range (``field`` names it).
- :class:`CheckpointError`: a checkpoint (weights, config.json, tokenizer files) is missing a
  part, corrupt or truncated (``file`` names the file).
- :class:`InvalidRequestError`: a request (prompt, token ids, chat messages) cannot be served as
  given (``param`` names the request field; the server answers 400 with it).

All derive from :class:`CacheflowUserError`, itself a ``ValueError``, so ``except ValueError``
keeps working. The ``cacheflow`` command prints one line for any of them and exits with 2.
"""

from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["CacheflowUserError", "CheckpointError", "InvalidArgumentError",
           "InvalidRequestError", "check_text"]


class CacheflowUserError(ValueError):
    """Something the user gave cacheflow is wrong; the message says what and where."""


class InvalidArgumentError(CacheflowUserError):
    """An argument is of the wrong type or out of range.

    ``field``: the argument's name as the user wrote it (``"block_size"``,
    ``"SamplingParams.temperature"``); ``value``: what was given.
    """

    def __init__(self, message: str, *, field: Optional[str] = None,
                 value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class CheckpointError(CacheflowUserError):
    """A checkpoint file is missing a part, corrupt or truncated; ``file`` names it."""

    def __init__(self, message: str, *, file: Optional[str | os.PathLike[str]] = None) -> None:
        super().__init__(message)
        self.file = None if file is None else str(file)


class InvalidRequestError(CacheflowUserError):
    """A request cannot be served as given.

    ``param``: the request field at fault (OpenAI's ``param``, e.g. ``"prompt"``);
    ``code``: a machine-readable reason when there is one (``"context_length_exceeded"``).
    """

    def __init__(self, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def check_text(text: str, what: str) -> None:
    """Raises InvalidRequestError if ``text`` is not valid Unicode (holds a lone surrogate, as
    ``"\\ud800"`` in JSON gives), naming ``what`` and the first bad position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{what} is not valid Unicode: lone surrogate {text[exc.start]!r} at index "
            f"{exc.start}", param=what.split(".")[0].split("[")[0]) from None
