"""HF configs (from a checkpoint folder or a GGUF file) and what the runtime needs of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from cacheflow_models.registry import resolve_architecture
from cacheflow_runtime.config import ModelConfig, is_int, parse_dtype
from cacheflow_runtime.errors import CheckpointError, InvalidArgumentError
from cacheflow_runtime.layers.rotary_embedding import length_dependent_rope, rope_max_positions
from cacheflow_runtime.weights import GGUFFile, detect_format, gguf_file


def split_gguf_path(path: str | Path, what: str = "model path"
                    ) -> tuple[Path, Optional[str]]:
    """(folder, gguf file name or None) for a checkpoint folder, a .gguf file or a GGUF folder;
    ``what`` names the path in errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{what} {str(path)!r} is a file but not a .gguf file; give a "
                             "checkpoint folder or a .gguf file")
        return path.parent, path.name
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and detect_format(path) == "gguf":
        return path, ggufs[0].name
    return path, None


# What build_model_config needs from a config.json, by the names architectures use for it.
_REQUIRED_KEYS = {"hidden size": ("hidden_size", "n_embd", "d_model"),
                  "number of attention heads": ("num_attention_heads", "n_head"),
                  "number of layers": ("num_hidden_layers", "n_layer"),
                  "vocabulary size": ("vocab_size",)}


def load_hf_config(path: str | Path) -> PretrainedConfig:
    """The HF config of a checkpoint folder or GGUF file (no network access).

    Raises:
        FileNotFoundError: the path or its config.json does not exist.
        CheckpointError: config.json is not a JSON object, lacks a size the runtime needs, or
            transformers cannot build a config from it (or from the GGUF file's metadata).
    """
    folder, gguf_file = split_gguf_path(path)
    if gguf_file is not None:
        try:
            config = _config_from_gguf(gguf_file_of(folder / gguf_file))
        except Exception as exc:  # the parser raises on truncated or corrupt files
            raise CheckpointError(f"cannot read the GGUF file {folder / gguf_file}: "
                                  f"{type(exc).__name__}: {exc}", file=folder / gguf_file) \
                from exc
        if config is not None:
            config._name_or_path = str(folder)  # as from_pretrained(folder) sets it
            return config
        return _from_pretrained(folder, gguf_file, folder / gguf_file)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {str(folder)!r}")
    raw = read_config_json(config_file)
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        # A model type transformers does not know: read it as a plain config, so that
        # resolve_architecture can tell which architectures are supported instead of
        # transformers asking for an upgrade.
        return PretrainedConfig.from_dict(raw)
    _check_required_keys(raw, config_file)
    # transformers' own check of this raises a validation error that names neither the file
    # nor the numbers; say it first.
    hidden = next(raw[n] for n in _REQUIRED_KEYS["hidden size"] if raw.get(n) is not None)
    heads = next(raw[n] for n in _REQUIRED_KEYS["number of attention heads"]
                 if raw.get(n) is not None)
    _check_heads(config_file, hidden, heads, raw.get("num_key_value_heads") or heads,
                 raw.get("head_dim"))
    return _from_pretrained(folder, None, config_file)


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


def read_config_json(config_file: Path) -> dict[str, Any]:
    """The object in a config.json (CheckpointError naming the file if it is not one)."""
    try:
        raw = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{config_file} is not UTF-8 text: {exc}", file=config_file) \
            from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}", file=config_file) \
            from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, found "
                              f"{type(raw).__name__}", file=config_file)
    return raw


def _check_required_keys(raw: dict[str, Any], config_file: Path) -> None:
    for what, names in _REQUIRED_KEYS.items():
        present = [n for n in names if raw.get(n) is not None]
        if not present:
            raise CheckpointError(f"{config_file} does not give the model's {what} (expected "
                                  f"{' or '.join(repr(n) for n in names)})", file=config_file)
        value = raw[present[0]]
        if not is_int(value) or value < 1:
            raise CheckpointError(f"{config_file}: {present[0]!r} must be a positive integer, "
                                  f"got {value!r}", file=config_file)


def _from_pretrained(folder: Path, gguf_file: Optional[str], file: Path) -> PretrainedConfig:
    """AutoConfig.from_pretrained, any failure turned into a CheckpointError naming ``file``."""
    try:
        return AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file,
                                          local_files_only=True)
    except Exception as exc:  # transformers / huggingface_hub / gguf raise many kinds
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        if len(reason) > 500:
            reason = reason[:500] + " ..."
        text = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        what = "GGUF file" if gguf_file else "model config"
        raise CheckpointError(f"cannot read the {what} {file}: {text}", file=file) from exc


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


def _length_dependent_rope(config: PretrainedConfig,
                           max_position: int) -> Optional[tuple[str, int]]:
    """The rotary scaling rule that rotates a prompt by its length (dynamic NTK, LongRoPE) of
    the config's top level or of either kind of layer where it has one per kind; None if
    none does."""
    for layer_type in (None, "full_attention", "sliding_attention"):
        rule = length_dependent_rope(max_position, rope_settings(config, layer_type)[1])
        if rule is not None:
            return rule
    return None


def eos_token_ids(path: str | Path, config: PretrainedConfig) -> list[int]:
    """The model's EOS ids, the config's first: the config's ``eos_token_id`` (one id or a
    list) and those of a ``generation_config.json`` beside the checkpoint (chat models list
    their end-of-turn tokens there, e.g. LLaMA-3.1 instruct's ``<|eot_id|>``), as HF
    ``generate`` stops at any of them."""
    found = _id_list(getattr(config, "eos_token_id", None), path)
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    file = folder / "generation_config.json"
    if file.is_file():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}", file=str(file)) from exc
        if isinstance(data, dict):
            found += [i for i in _id_list(data.get("eos_token_id"), file) if i not in found]
    return found


def _id_list(value: Any, source: str | Path) -> list[int]:
    """A token id or a list of them as a list without repeats (CheckpointError otherwise)."""
    values = [] if value is None else list(value) if isinstance(value, (list, tuple)) \
        else [value]
    if not all(is_int(v) and v >= 0 for v in values):
        raise CheckpointError(f"eos_token_id must be a token id or a list of token ids, got "
                              f"{value!r}", file=str(source))
    return list(dict.fromkeys(int(v) for v in values))


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


def _first(config: PretrainedConfig, *names: str) -> int:
    """The first of ``names`` the config sets, as a positive int (CheckpointError if none)."""
    for name in names:
        value = getattr(config, name, None)
        if value is None:
            continue
        if not is_int(value) or value < 1:
            raise CheckpointError(f"the model config's {name!r} must be a positive integer, "
                                  f"got {value!r}", file=_config_source(config))
        return value
    raise CheckpointError(f"the model config has none of {names}",
                          file=_config_source(config))


def _config_source(config: PretrainedConfig) -> Optional[str]:
    return getattr(config, "_name_or_path", None) or None


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


def _check_heads(path: str | Path, hidden: int, num_heads: int, num_kv: Any,
                 head_dim: Any) -> None:
    """CheckpointError unless the attention heads fit the hidden size and each other."""
    problem = None
    if not is_int(num_kv) or num_kv < 1:
        problem = f"num_key_value_heads must be a positive integer, got {num_kv!r}"
    elif num_heads % num_kv:
        problem = (f"num_attention_heads ({num_heads}) must be a multiple of "
                   f"num_key_value_heads ({num_kv})")
    elif head_dim is not None and (not is_int(head_dim) or head_dim < 1):
        problem = f"head_dim must be a positive integer, got {head_dim!r}"
    elif head_dim is None and hidden % num_heads:
        problem = (f"the hidden size ({hidden}) must be divisible by the number of attention "
                   f"heads ({num_heads})")
    if problem is not None:
        raise CheckpointError(f"the model config {path} is inconsistent: {problem}",
                              file=path)


def build_model_config(path: str | Path, dtype: str | torch.dtype = "auto",
                       max_model_len: Optional[int] = None,
                       device_type: str = "cpu") -> ModelConfig:
    """Reads the checkpoint's config and returns the runtime's ModelConfig for it."""
    if max_model_len is not None and (not is_int(max_model_len) or max_model_len < 1):
        raise InvalidArgumentError(f"max_model_len must be a positive integer or None, "
                                   f"got {max_model_len!r}", field="max_model_len",
                                   value=max_model_len)
    config = load_hf_config(path)
    architecture = resolve_architecture(config)
    num_heads = _first(config, "num_attention_heads", "n_head")
    hidden = _first(config, "hidden_size", "n_embd")
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None)
    _check_heads(path, hidden, num_heads, num_kv, head_dim)
    head_size = int(head_dim or hidden // num_heads)
    # linear / dynamic rope_scaling stretch the trained length by their factor.
    trained_max = _first(config, "max_position_embeddings", "n_positions")
    model_max = rope_max_positions(trained_max, rope_settings(config)[1])
    if max_model_len is None:
        max_model_len = model_max
    elif max_model_len > model_max:
        raise InvalidArgumentError(f"max_model_len must be an integer in [1, {model_max}] for "
                                   f"this model, got {max_model_len!r}", field="max_model_len",
                                   value=max_model_len)
    eos_ids = eos_token_ids(path, config)
    return ModelConfig(
        model_path=str(path), architecture=architecture, hf_config=config,
        num_layers=_first(config, "num_hidden_layers", "n_layer"),
        num_attention_heads=num_heads, num_kv_heads=num_kv, head_size=head_size,
        hidden_size=hidden, vocab_size=_first(config, "vocab_size"), max_model_len=max_model_len,
        dtype=resolve_dtype(dtype, config, device_type),
        eos_token_id=eos_ids[0] if eos_ids else None, extra_eos_token_ids=tuple(eos_ids[1:]),
        weights_format=detect_format(path),
        length_dependent_rope=_length_dependent_rope(config, trained_max))
