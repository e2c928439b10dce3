"""Random-weight checkpoints of a given shape, for benchmarks: no download, no fp32 HF model.

``--hf-config`` names a shape: a preset of ``PRESETS`` (``llama-7b`` is LLaMA-2-7B's), a path
to a ``config.json`` (or the folder holding one), or an inline JSON object. An inline object may
name a preset to start from (``{"preset": "llama-7b", "num_hidden_layers": 4}``); otherwise it
needs a ``model_type`` that transformers knows.

The tensor names and shapes come from the HF model built on the ``meta`` device (no memory); each
tensor is then drawn directly on the target device in the target dtype and written to sharded
safetensors files next to the config and a tokenizer whose vocabulary covers the model's (one
token per byte, then filler tokens), so token-id prompts work and outputs detokenize.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

_LLAMA_BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}

# Shapes a benchmark can name with one flag. Every preset is a LLaMA (the architecture the
# engine's kernels and CUDA graphs were tuned on); other shapes come as JSON.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": {**_LLAMA_BASE, "num_hidden_layers": 32, "hidden_size": 4096,
                 "num_attention_heads": 32, "num_key_value_heads": 32,
                 "intermediate_size": 11008, "vocab_size": 32000,
                 "max_position_embeddings": 4096},
    "llama-13b": {**_LLAMA_BASE, "num_hidden_layers": 40, "hidden_size": 5120,
                  "num_attention_heads": 40, "num_key_value_heads": 40,
                  "intermediate_size": 13824, "vocab_size": 32000,
                  "max_position_embeddings": 4096},
    "tinyllama-1.1b": {**_LLAMA_BASE, "num_hidden_layers": 22, "hidden_size": 2048,
                       "num_attention_heads": 32, "num_key_value_heads": 4,
                       "intermediate_size": 5632, "vocab_size": 32000,
                       "max_position_embeddings": 2048},
    "tiny": {**_LLAMA_BASE, "num_hidden_layers": 2, "hidden_size": 64,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
             "vocab_size": 512, "max_position_embeddings": 512},
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "llama-7b": "LLaMA-2-7B: 32 layers, hidden 4096, 32 heads, MLP 11008, vocabulary 32000",
    "llama-13b": "LLaMA-2-13B: 40 layers, hidden 5120, 40 heads, MLP 13824, vocabulary 32000",
    "tinyllama-1.1b": "TinyLlama-1.1B: 22 layers, hidden 2048, 32 query / 4 KV heads, "
                      "MLP 5632, vocabulary 32000",
    "tiny": "2 layers, hidden 64, 4 query / 2 KV heads, MLP 128, vocabulary 512 (CPU smoke runs)",
}

SHARD_BYTES = 2 << 30  # tensors per safetensors file, so the host holds one shard at a time
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def hf_config_fields(spec: str) -> dict[str, Any]:
    """The config fields named by ``--hf-config``: a preset name, a JSON file or folder, or an
    inline JSON object (ValueError / FileNotFoundError naming the spec when it is none)."""
    spec = spec.strip()
    if spec in PRESETS:
        return dict(PRESETS[spec])
    if spec.startswith("{"):
        try:
            fields = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"--hf-config is not valid JSON: {exc}") from exc
        source = "the inline JSON"
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--hf-config {spec!r} is neither a preset "
                             f"({', '.join(PRESETS)}), a config.json path nor a JSON object")
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"--hf-config file {str(path)!r} is not valid JSON: {exc}") from exc
        source = repr(str(path))
    if not isinstance(fields, dict):
        raise ValueError(f"--hf-config: {source} must be a JSON object, "
                         f"got {type(fields).__name__}")
    preset = fields.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--hf-config: unknown preset {preset!r} in {source}; "
                             f"presets: {', '.join(PRESETS)}")
        fields = {**PRESETS[preset], **fields}
    if not isinstance(fields.get("model_type"), str):
        raise ValueError(f"--hf-config: {source} has no \"model_type\" (or \"preset\")")
    return fields


def build_hf_config(fields: dict[str, Any]) -> PretrainedConfig:
    """The transformers config of ``fields`` (``architectures`` filled in from ``model_type``
    when absent)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = fields["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"--hf-config: model_type {model_type!r} is unknown to transformers")
    fields = {k: v for k, v in fields.items() if k != "model_type"}
    if not fields.get("architectures"):
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"--hf-config: model_type {model_type!r} has no causal LM class; "
                             "give \"architectures\"")
        fields["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    try:
        config = CONFIG_MAPPING[model_type](**fields)
    except Exception as exc:  # transformers' field validators raise types of their own too
        raise ValueError(f"--hf-config: invalid {model_type} config: {exc}") from exc
    try:  # on the meta device: sizes no model can have (heads not dividing the width, ...)
        meta_tensors(config)
    except Exception as exc:
        raise ValueError(f"--hf-config: no {model_type} model has this config: {exc}") from exc
    return config


def meta_tensors(config: PretrainedConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Name -> (shape, is floating point) of every tensor a checkpoint of ``config`` stores, from
    the HF model built on the ``meta`` device (tied weights once, under their first name)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {name for name, _ in model.named_parameters()}  # shared (tied) ones once
    all_params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {name: (tuple(t.shape), t.is_floating_point())
            for name, t in model.state_dict().items()
            if name in unique or name not in all_params}


def parameter_count(config: PretrainedConfig) -> int:
    """Number of parameters of the model of ``config`` (tied weights counted once)."""
    import math

    return sum(math.prod(shape) for shape, floating in meta_tensors(config).values() if floating)


def vocab_tokenizer(vocab_size: int) -> Any:
    """A byte-level tokenizer of exactly ``vocab_size`` tokens: 3 specials, 256 bytes, then
    filler tokens ``<|N|>`` that text never encodes to but that decode (random weights sample
    any id of the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab)} for the byte tokenizer of a "
                         f"random checkpoint, got {vocab_size}")
    for i in range(len(vocab), vocab_size):
        vocab[f"<|{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")


def _shards(tensors: dict[str, tuple[tuple[int, ...], bool]],
            itemsize: int) -> list[list[str]]:
    import math

    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in tensors.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _random_tensor(name: str, shape: tuple[int, ...], floating: bool, dtype: torch.dtype,
                   device: torch.device, std: float, gen: torch.Generator) -> torch.Tensor:
    import torch

    if not floating:
        return torch.zeros(shape, dtype=torch.int64)
    if len(shape) == 1:  # norm scales 1, biases 0: activations stay in range over many layers
        fill = 1.0 if name.endswith("weight") else 0.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, std, generator=gen)


def write_random_checkpoint(config: PretrainedConfig, folder: Path, dtype: torch.dtype,
                            device: torch.device, seed: int = 0,
                            progress: bool = True) -> Path:
    """Writes config.json, random weights (safetensors, ``dtype``, drawn on ``device``) and the
    vocabulary-sized byte tokenizer into ``folder``; returns it."""
    import math

    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    tensors = meta_tensors(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(tensors, itemsize)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    gen = torch.Generator(device=device).manual_seed(seed)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=len(tensors), desc="Writing random weights", unit="tensor",
              disable=not progress) as bar:
        for file_name, shard in zip(names, shards):
            out: dict[str, torch.Tensor] = {}
            for name in shard:
                shape, floating = tensors[name]
                tensor = _random_tensor(name, shape, floating, dtype, device, std, gen)
                out[name] = tensor.cpu()
                total += math.prod(shape) * out[name].element_size()
                weight_map[name] = file_name
                bar.update(1)
            save_file(out, str(folder / file_name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    # transformers 5 names the field dtype, 4 torch_dtype; build_model_config reads either.
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    config.save_pretrained(str(folder))
    vocab_tokenizer(int(config.vocab_size)).save_pretrained(str(folder))
    return folder

