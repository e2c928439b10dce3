"""cacheflow-serve: the offline LLM API and the `cacheflow` command.

The public names are imported on first use, so that ``cacheflow --help`` (which imports this
package) does not wait for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"LLM": "cacheflow_serve.llm", "CompletionOutput": "cacheflow_runtime",
         "RequestOutput": "cacheflow_runtime", "SamplingParams": "cacheflow_runtime",
         "Logprob": "cacheflow_runtime", "TextPrompt": "cacheflow_serve.inputs",
         "TokensPrompt": "cacheflow_serve.inputs", "BeamSearchParams": "cacheflow_runtime"}

__all__ = ["LLM", "BeamSearchParams", "CompletionOutput", "Logprob", "RequestOutput",
           "SamplingParams",
           "TextPrompt", "TokensPrompt", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cacheflow_serve' has no attribute {name!r}")
