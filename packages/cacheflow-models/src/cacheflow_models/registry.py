"""Which registered architecture serves an HF config.

The one registry is the ``cacheflow.models`` entry-point group (this package publishes its
built-in classes there in pyproject.toml; a third-party package registers its own the same way).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from cacheflow_runtime.registry import supported_architectures

# Configs read from GGUF files name no architecture; their model_type does.
_MODEL_TYPE_DEFAULTS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}


def resolve_architecture(config: PretrainedConfig) -> str:
    """The registered architecture that serves ``config`` (ValueError listing supported ones)."""
    names = list(getattr(config, "architectures", None) or [])
    default = _MODEL_TYPE_DEFAULTS.get(getattr(config, "model_type", ""))
    if default:
        names.append(default)
    known = set(supported_architectures())
    for name in names:
        if name in known:
            return name
    shown = names or [getattr(config, "model_type", "unknown")]
    raise ValueError(f"model architecture {shown[0]!r} is not supported; supported "
                     f"architectures: {', '.join(sorted(known))}")
