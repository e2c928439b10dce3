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
from cacheflow_runtime.weights import detect_format


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
    return AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)


def _model_type(config_file: Path) -> Optional[str]:
    """The ``model_type`` of a config.json, None if it has none or cannot be read."""
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def rope_settings(config: PretrainedConfig, layer_type: Optional[str] = None
                  ) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling or None) from either transformers 4 or 5 style configs.

    ``layer_type`` ("sliding_attention" / "full_attention") picks the settings of that kind of
    layer where a config has one per kind (Gemma 3: transformers 5 nests ``rope_parameters`` by
    layer type; transformers 4 gives local layers ``rope_local_base_freq`` and no scaling).
    longrope / su settings get ``original_max_position_embeddings`` from the config's top level
    when they lack it (Phi-3).
    """
    params = getattr(config, "rope_parameters", None)
    if params and layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if params:
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else dict(params)
    else:
        theta = float(getattr(config, "rope_theta", 10000.0))
        scaling = getattr(config, "rope_scaling", None)
        if layer_type == "sliding_attention" and hasattr(config, "rope_local_base_freq"):
            theta, scaling = float(config.rope_local_base_freq), None
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
    if scaling and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su") \
            and scaling.get("original_max_position_embeddings") is None:
        scaling = {**scaling, "original_max_position_embeddings":
                   getattr(config, "original_max_position_embeddings", None)}
    return theta, scaling


def partial_rotary_factor(config: PretrainedConfig) -> float:
    """The fraction of each head that the rotary embedding turns (1.0: all of it), from
    ``partial_rotary_factor`` in the config or in its ``rope_parameters`` (transformers 5)."""
    factor = getattr(config, "partial_rotary_factor", None)
    params = getattr(config, "rope_parameters", None)
    if factor is None and isinstance(params, dict):
        factor = params.get("partial_rotary_factor")
    factor = 1.0 if factor is None else float(factor)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {factor}")
    return factor


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
