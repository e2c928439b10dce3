"""Tiny configs of the dense architectures of issue 15 (Qwen3, Gemma 2, Gemma 3, Phi-3) over the
byte vocabulary of cacheflow_models.testing, and the variants their tests run."""

from __future__ import annotations

from typing import Any

from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

from cacheflow_models.testing import BYTE_VOCAB_SIZE

_COMMON: dict[str, Any] = dict(
    vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_qwen3_config(**overrides: Any) -> Qwen3Config:
    """A 2-layer Qwen3 config (GQA, head_dim 16, tied embeddings as in the small Qwen3s)."""
    settings: dict[str, Any] = dict(_COMMON, head_dim=16, rms_norm_eps=1e-6,
                                    tie_word_embeddings=True, rope_theta=1000000.0)
    settings.update(overrides)
    return Qwen3Config(**settings)


def tiny_gemma2_config(**overrides: Any) -> Gemma2Config:
    """A 2-layer Gemma 2 config: layer 0 local with an 8-token window (shorter than the test
    prompts), layer 1 global; attention and final logit soft-capping low enough to bite on
    random weights."""
    settings: dict[str, Any] = dict(_COMMON, head_dim=16, query_pre_attn_scalar=16,
                                    sliding_window=8, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0, rms_norm_eps=1e-6,
                                    tie_word_embeddings=True, rope_theta=10000.0,
                                    hidden_activation="gelu_pytorch_tanh")
    settings.update(overrides)
    return Gemma2Config(**settings)


def tiny_gemma3_config(**overrides: Any) -> Gemma3TextConfig:
    """A 3-layer Gemma 3 text config: local, local, global (``sliding_window_pattern`` 3) with
    an 8-token window, local rotary base 10,000 and global 1,000,000 with linear scaling."""
    settings: dict[str, Any] = dict(_COMMON, num_hidden_layers=3, head_dim=16,
                                    query_pre_attn_scalar=16, sliding_window=8,
                                    sliding_window_pattern=3, final_logit_softcapping=3.0,
                                    rms_norm_eps=1e-6, tie_word_embeddings=True,
                                    hidden_activation="gelu_pytorch_tanh",
                                    rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0})
    settings.update(overrides)
    return Gemma3TextConfig(**settings)


# Phi-3 with longrope: trained on 24 positions, stretched to 96. The 40-token test prompt runs
# on the long factors from its prefill; the 1- to 17-token ones switch during generation.
PHI3_LONGROPE: dict[str, Any] = dict(max_position_embeddings=96,
                                     original_max_position_embeddings=24)


def longrope_scaling(rotary_dim: int, kind: str = "longrope") -> dict[str, Any]:
    """A longrope rope_scaling with distinct short and long factors for ``rotary_dim``, switching
    at PHI3_LONGROPE's original length."""
    half = rotary_dim // 2
    return {"type": kind, "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
            "original_max_position_embeddings":
                PHI3_LONGROPE["original_max_position_embeddings"]}


def tiny_phi3_config(**overrides: Any) -> Phi3Config:
    """A 2-layer Phi-3 config (GQA, no rope scaling, untied)."""
    settings: dict[str, Any] = dict(_COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                    rope_theta=10000.0, original_max_position_embeddings=256,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                                    sliding_window=None)
    settings.update(overrides)
    return Phi3Config(**settings)



VARIANTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "qwen3_gqa_tied": (tiny_qwen3_config, {}),
    "qwen3_mqa_untied_head_dim32": (tiny_qwen3_config, dict(
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)),
    "qwen3_window_bias": (tiny_qwen3_config, dict(
        use_sliding_window=True, sliding_window=8, max_window_layers=1, attention_bias=True,
        num_key_value_heads=4)),
    "gemma2_gqa_tied": (tiny_gemma2_config, {}),
    "gemma2_mqa_untied_scalar": (tiny_gemma2_config, dict(
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, tie_word_embeddings=False,
        num_hidden_layers=3)),
    "gemma2_no_softcap_mha": (tiny_gemma2_config, dict(
        num_key_value_heads=4, attn_logit_softcapping=None, final_logit_softcapping=None,
        sliding_window=4)),
    "gemma3_gqa_tied": (tiny_gemma3_config, {}),
    "gemma3_mqa_untied": (tiny_gemma3_config, dict(
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
        final_logit_softcapping=None, rope_scaling=None)),
    "gemma3_layer_types": (tiny_gemma3_config, dict(
        num_hidden_layers=4, sliding_window=5, query_pre_attn_scalar=20,
        layer_types=["full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"])),
    "phi3_gqa": (tiny_phi3_config, {}),
    "phi3_partial_window": (tiny_phi3_config, dict(
        partial_rotary_factor=0.5, sliding_window=8, num_key_value_heads=4,
        tie_word_embeddings=True)),
    "phi3_longrope": (tiny_phi3_config, dict(
        PHI3_LONGROPE, rope_scaling=longrope_scaling(16))),
    "phi3_su_partial_mqa": (tiny_phi3_config, dict(
        PHI3_LONGROPE, partial_rotary_factor=0.5, num_key_value_heads=1,
        rope_scaling=longrope_scaling(8, "su"))),
}


def variant_config(name: str) -> Any:
    """The HF config of test variant ``name``."""
    builder, overrides = VARIANTS[name]
    return builder(**overrides)
