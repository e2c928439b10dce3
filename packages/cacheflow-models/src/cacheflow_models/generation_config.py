"""A model's own sampling defaults (its "generation config"), for requests that leave them unset.

Sources, first found wins (``source="auto"``):

1. ``generation_config.json`` in the checkpoint folder (for a GGUF file: the folder holding it);
2. a GGUF file's ``general.sampling.*`` metadata (llama.cpp's keys);
3. for the default model, SmolLM2-135M-Instruct, the sampling its model card recommends
   (``default_model.DEFAULT_MODEL_SAMPLING``): its GGUF file carries none.

``source="vllm"`` or ``"none"``: no defaults (SamplingParams' own apply). Any other ``source`` is
a folder holding a ``generation_config.json``. Only sampling fields are taken: ``temperature``,
``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and ``max_new_tokens`` (HF names, the
last taken as ``max_tokens``, as vLLM does; llama.cpp's ``temp`` and ``penalty_repeat`` are
mapped to them). Its EOS ids are the model config's business (``hf_config.eos_token_ids``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from cacheflow_models.default_model import DEFAULT_MODEL_SAMPLING, is_default_model
from cacheflow_runtime.weights import checkpoint_files, detect_format, read_gguf_metadata

Number = Union[int, float]

#: The sampling fields a generation config may set, as SamplingParams names them.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")
#: generation_config.json names that differ from SamplingParams'.
_JSON_NAMES = {"max_tokens": "max_new_tokens"}
GENERATION_CONFIG_SOURCES = ("auto", "vllm", "none")
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}


def _from_json(file: Path) -> dict[str, Number]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read generation config {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"generation config {file} must hold a JSON object")
    picked = {k: data[_JSON_NAMES.get(k, k)] for k in SAMPLING_FIELDS
              if data.get(_JSON_NAMES.get(k, k)) is not None}
    for key, value in picked.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"generation config {file}: {_JSON_NAMES.get(key, key)} must be a "
                             f"number, got {value!r}")
    return picked


def _from_gguf(file: Path) -> dict[str, Number]:
    metadata = read_gguf_metadata(file)
    return {field: metadata[key] for key, field in _GGUF_KEYS.items()  # type: ignore[misc]
            if isinstance(metadata.get(key), (int, float))}


def load_generation_defaults(model: str | Path, source: str | Path = "auto"
                             ) -> dict[str, Number]:
    """The sampling defaults of the model at ``model`` (a checkpoint folder or .gguf file).

    ``source``: ``"auto"``, ``"vllm"``/``"none"`` or a folder with a generation_config.json (see
    the module docstring). Returns ``{}`` when there are none. ValueError names the file or value
    that is wrong.
    """
    if str(source) in ("vllm", "none"):
        return {}
    if str(source) != "auto":
        file = Path(source) / "generation_config.json"
        if not file.is_file():
            raise ValueError(f"generation_config must be 'auto', 'vllm', 'none' or a folder "
                             f"holding generation_config.json; {file} does not exist")
        return _from_json(file)
    path = Path(model)
    folder = path.parent if path.is_file() else path
    if (folder / "generation_config.json").is_file():
        return _from_json(folder / "generation_config.json")
    if detect_format(path) == "gguf":
        found = _from_gguf(checkpoint_files(path, "gguf")[0])
        if found:
            return found
    if is_default_model(path):
        return dict(DEFAULT_MODEL_SAMPLING)
    return {}
