"""HF configs (from a checkpoint folder or a GGUF file) and what the runtime needs of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from cacheflow_models.registry import resolve_architecture
from cacheflow_runtime.config import ModelConfig, parse_dtype
from cacheflow_runtime.layers.rotary_embedding import rope_max_positions
from cacheflow_runtime.weights import GGUFFile, detect_format, gguf_file


def split_gguf_path(path: str | Path) -> tuple[Path, Optional[str]]:
    """(folder, gguf file name or None) for a checkpoint folder, a .gguf file or a GGUF folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model path {str(path)!r} is a file but not a .gguf file; give a "
                             "checkpoint folder or a .gguf file")
        return path.parent, path.name
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and detect_format(path) == "gguf":
        return path, ggufs[0].name
    return path, None


def load_hf_config(path: str | Path) -> PretrainedConfig:
    """The HF config of a checkpoint folder or GGUF file (no network access)."""
    folder, gguf_file = split_gguf_path(path)
    if gguf_file is None and not (folder / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {str(folder)!r}")
    model_type = _model_type(folder / "config.json") if gguf_file is None else None
    if model_type is not None and model_type not in CONFIG_MAPPING:
        # A model type transformers does not know: read it as a plain config, so that
        # resolve_architecture can tell which architectures are supported instead of
        # transformers asking for an upgrade.
        return PretrainedConfig.from_json_file(str(folder / "config.json"))
    if gguf_file is not None:
        config = _config_from_gguf(gguf_file_of(folder / gguf_file))
        if config is not None:
            config._name_or_path = str(folder)  # as from_pretrained(folder) sets it
            return config
    return AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)


def gguf_file_of(path: Path) -> GGUFFile:
    """The runtime's parse of a GGUF file (shared with the weights: parsed once)."""
    return gguf_file(path)


# GGUF architectures whose HF config is the plain key mapping of transformers' GGUF tables
# (the others need transformers' own special cases and are read by it).
_PLAIN_GGUF_ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def _config_from_gguf(parsed: GGUFFile) -> Optional[PretrainedConfig]:
    """The HF config of a GGUF file from its already parsed metadata, the way transformers
    derives it (its GGUF key tables, tied embeddings when there is no ``output.weight``).
    None for an architecture outside ``_PLAIN_GGUF_ARCHS`` or an older transformers without
    the tables: the caller then lets transformers read the file."""
    try:
        from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    except ImportError:
        return None
    meta = parsed.metadata
    arch = str(meta.get("general.architecture", ""))
    name = str(meta.get("general.name", ""))
    # llama.cpp writes Mistral models as "llama"; transformers tells them apart by name.
    model_type = "mistral" if arch == "llama" and "mistral" in name.lower() else arch
    if model_type not in _PLAIN_GGUF_ARCHS or model_type not in GGUF_CONFIG_MAPPING:
        return None
    values: dict[str, Any] = {
        "tie_word_embeddings": all(t.name != "output.weight" for t in parsed.tensors)}
    values.update(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        prefix = model_type if prefix == arch else prefix
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if target is None or target == -1:
            continue
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, model_type)
        values[target] = value
    tokens = meta.get("tokenizer.ggml.tokens")
    if "vocab_size" not in values and isinstance(tokens, list):
        values["vocab_size"] = len(tokens)  # as transformers does when the file gives none
    values["model_type"] = model_type
    return CONFIG_MAPPING[model_type].from_dict(values)


def _model_type(config_file: Path) -> Optional[str]:
    """The ``model_type`` of a config.json, None if it has none or cannot be read."""
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def rope_settings(config: PretrainedConfig) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling or None) from either transformers 4 or 5 style configs."""
    params = getattr(config, "rope_parameters", None)
    if params:
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, (None if kind == "default" else dict(params))
    theta = float(getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return theta, scaling


def _first(config: PretrainedConfig, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"the model config has none of {names}")


def resolve_dtype(dtype: str | torch.dtype, config: PretrainedConfig,
                  device_type: str) -> torch.dtype:
    """"auto": float32 on CPU; on GPUs the checkpoint's half type, else bfloat16."""
    if dtype != "auto":
        return parse_dtype(dtype)
    if device_type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = parse_dtype(stored)
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


def build_model_config(path: str | Path, dtype: str | torch.dtype = "auto",
                       max_model_len: Optional[int] = None,
                       device_type: str = "cpu") -> ModelConfig:
    """Reads the checkpoint's config and returns the runtime's ModelConfig for it."""
    config = load_hf_config(path)
    architecture = resolve_architecture(config)
    num_heads = int(_first(config, "num_attention_heads", "n_head"))
    hidden = int(_first(config, "hidden_size", "n_embd"))
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_size = int(getattr(config, "head_dim", None) or hidden // num_heads)
    # linear / dynamic rope_scaling stretch the trained length by their factor.
    model_max = rope_max_positions(int(_first(config, "max_position_embeddings", "n_positions")),
                                   rope_settings(config)[1])
    if max_model_len is None:
        max_model_len = model_max
    elif not isinstance(max_model_len, int) or not 1 <= max_model_len <= model_max:
        raise ValueError(f"max_model_len must be an integer in [1, {model_max}] for this model, "
                         f"got {max_model_len!r}")
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return ModelConfig(
        model_path=str(path), architecture=architecture, hf_config=config,
        num_layers=int(_first(config, "num_hidden_layers", "n_layer")),
        num_attention_heads=num_heads, num_kv_heads=num_kv, head_size=head_size,
        hidden_size=hidden, vocab_size=int(config.vocab_size), max_model_len=max_model_len,
        dtype=resolve_dtype(dtype, config, device_type), eos_token_id=eos,
        weights_format=detect_format(path))
