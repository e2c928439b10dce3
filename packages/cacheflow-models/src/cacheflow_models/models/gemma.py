"""Gemma 2 and Gemma 3 (text): the LLaMA layout with Gemma's changes.

- embeddings multiplied by sqrt(hidden_size), rounded to the model dtype first;
- RMSNorms that scale by (1 + weight), computed in float32;
- four norms per layer: before and after attention, before and after the MLP;
- GeGLU MLP (``hidden_activation``, gelu with the tanh approximation);
- attention scale ``query_pre_attn_scalar ** -0.5``;
- local (sliding-window) and global layers alternating by ``layer_types`` (older configs:
  Gemma 2 every other layer from the first, Gemma 3 ``sliding_window_pattern``);
- Gemma 2: attention logit soft-capping (``attn_logit_softcapping``);
- Gemma 3: per-head RMSNorms of queries and keys, and a rotary base per layer type (local
  ``rope_local_base_freq``, global ``rope_theta`` with its ``rope_scaling``);
- both: final logit soft-capping (``final_logit_softcapping``).

HF's modeling_gemma2.py and modeling_gemma3.py are the reference for the math and the weight
names. HF's Gemma 3 does not soft-cap attention logits even if the config names a cap; neither
do we. Bidirectional attention (``use_bidirectional_attention``, embedding models) is refused.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.hf_config import rope_settings
from cacheflow_models.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)
from cacheflow_models.models.qwen3 import norm_heads
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.layers.attention import KVCache
from cacheflow_runtime.layers.layernorm import GemmaRMSNorm


def gemma_layer_type(config: PretrainedConfig, layer_idx: int) -> str:
    """"sliding_attention" or "full_attention" for layer ``layer_idx``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return str(layer_types[layer_idx])
    pattern = int(getattr(config, "sliding_window_pattern", None)
                  or (6 if config.model_type == "gemma3_text" else 2))
    return "sliding_attention" if (layer_idx + 1) % pattern else "full_attention"


class Gemma2Attention(LlamaAttention):
    """Attention scaled by query_pre_attn_scalar, soft-capped, with a window on local layers."""

    def attention_options(self, config: PretrainedConfig, layer_idx: int,
                          head_dim: int) -> dict[str, Any]:
        """Gemma's scale, window by layer type and rotary (per layer type for Gemma 3)."""
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma configs with use_bidirectional_attention=True (embedding "
                             "models) are not supported: cacheflow runs causal decoders")
        layer_type = gemma_layer_type(config, layer_idx)
        theta, scaling = rope_settings(config, layer_type)
        window = getattr(config, "sliding_window", None)
        max_position = config.max_position_embeddings
        if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            # Gemma 3's max_position_embeddings is already the stretched length (the model's
            # max_model_len): the rotary table needs no factor more rows.
            max_position = math.ceil(max_position / float(scaling["factor"]))
        return dict(scale=float(config.query_pre_attn_scalar) ** -0.5, rotary_dim=head_dim,
                    max_position=max_position, base=theta, rope_scaling=scaling,
                    sliding_window=(int(window) if window is not None
                                    and layer_type == "sliding_attention" else None),
                    logits_soft_cap=self.logits_soft_cap(config))

    def logits_soft_cap(self, config: PretrainedConfig) -> Optional[float]:
        """Gemma 2 caps attention logits at ``attn_logit_softcapping``."""
        cap = getattr(config, "attn_logit_softcapping", None)
        return None if cap is None else float(cap)


class Gemma3Attention(Gemma2Attention):
    """Gemma 2's attention without logit soft-capping, with per-head q/k norms."""

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0,
                 qkv_bias: Optional[bool] = None, o_bias: Optional[bool] = None) -> None:
        super().__init__(config, layer_idx, qkv_bias, o_bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def logits_soft_cap(self, config: PretrainedConfig) -> Optional[float]:
        """None: HF's Gemma 3 never soft-caps attention logits."""
        return None

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query head through q_norm, each key head through k_norm."""
        return norm_heads(self.q_norm, q, self.head_dim), norm_heads(self.k_norm, k, self.head_dim)


class Gemma2DecoderLayer(LlamaDecoderLayer):
    """x + post_attn_norm(attn(input_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x))),
    every norm a (1 + weight) RMSNorm."""

    attention_cls: type[Gemma2Attention] = Gemma2Attention
    norm_cls = GemmaRMSNorm

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0,
                 qkv_bias: Optional[bool] = None, o_bias: Optional[bool] = None) -> None:
        super().__init__(config, layer_idx, qkv_bias, o_bias)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def build_mlp(self, config: PretrainedConfig, layer_idx: int) -> nn.Module:
        """GeGLU: the gated MLP with ``hidden_activation`` (gelu_pytorch_tanh), no biases."""
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        return LlamaMLP(config.hidden_size, config.intermediate_size, False, act)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """One block over the flattened batch."""
        attn = self.self_attn(positions, self.input_layernorm(hidden_states), kv_cache,
                              input_metadata)
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp)


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's layer with Gemma 3's attention."""

    attention_cls = Gemma3Attention


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 (see the module docstring); GGUF files as llama.cpp writes them (norm weights
    stored as 1 + weight, q/k rows not permuted)."""

    decoder_layer_cls: type[Gemma2DecoderLayer] = Gemma2DecoderLayer
    gguf_rotary_permuted = False
    gguf_layer_names = {
        "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    }

    def build_model(self, config: PretrainedConfig) -> nn.Module:
        """Scaled embeddings, Gemma decoder layers, a (1 + weight) final norm."""
        return LlamaModel(config, self.qkv_bias, self.o_bias, self.decoder_layer_cls,
                          GemmaRMSNorm, embed_scale=config.hidden_size ** 0.5)

    def gguf_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """llama.cpp stores Gemma's norm weights as 1 + weight: subtract it again (as HF)."""
        return tensor - 1 if name.endswith("norm.weight") else tensor

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits, soft-capped at ``final_logit_softcapping`` (in their dtype, as
        HF)."""
        logits = super().compute_logits(hidden_states)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text models (see the module docstring)."""

    decoder_layer_cls = Gemma3DecoderLayer
