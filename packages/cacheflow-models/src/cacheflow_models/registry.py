"""The built-in architectures: HF ``architectures`` name -> model class.

Published to the runtime as the ``cacheflow.models`` entry-point group (see pyproject.toml); a
third-party package registers its own classes there the same way.
"""

from __future__ import annotations

import importlib

from transformers import PretrainedConfig

from cacheflow_runtime.model_executor.registry import supported_architectures

_MODEL_REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "cacheflow_models.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "cacheflow_models.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "cacheflow_models.models.llama:Qwen2ForCausalLM",
    "GPT2LMHeadModel": "cacheflow_models.models.gpt2:GPT2LMHeadModel",
    "OPTForCausalLM": "cacheflow_models.models.opt:OPTForCausalLM",
    "GPTNeoXForCausalLM": "cacheflow_models.models.gpt_neox:GPTNeoXForCausalLM",
}

# Configs read from GGUF files name no architecture; their model_type does.
_MODEL_TYPE_DEFAULTS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}


def get_model_class(architecture: str) -> type:
    """The built-in class for ``architecture``."""
    module, _, name = _MODEL_REGISTRY[architecture].partition(":")
    return getattr(importlib.import_module(module), name)


def resolve_architecture(config: PretrainedConfig) -> str:
    """The registered architecture that serves ``config`` (ValueError listing supported ones)."""
    names = list(getattr(config, "architectures", None) or [])
    default = _MODEL_TYPE_DEFAULTS.get(getattr(config, "model_type", ""))
    if default:
        names.append(default)
    known = set(supported_architectures()) | set(_MODEL_REGISTRY)
    for name in names:
        if name in known:
            return name
    shown = names or [getattr(config, "model_type", "unknown")]
    raise ValueError(f"model architecture {shown[0]!r} is not supported; supported "
                     f"architectures: {', '.join(sorted(known))}")
