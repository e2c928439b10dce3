"""Qwen3: the LLaMA layout with an RMSNorm over each query and key head before the rotary
embedding, no q/k/v biases (``attention_bias``), per-layer sliding windows from ``layer_types``.

HF's modeling_qwen3.py is the reference for the math and the weight names
(``self_attn.q_norm`` / ``self_attn.k_norm``, one weight of head_dim each).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from cacheflow_runtime.layers.layernorm import RMSNorm


def norm_heads(norm: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Applies ``norm`` to each head of ``x`` [num_tokens, heads * head_dim]."""
    num_tokens = x.shape[0]
    return norm(x.reshape(num_tokens, -1, head_dim)).reshape(num_tokens, -1)


class Qwen3Attention(LlamaAttention):
    """LLaMA attention with per-head RMSNorms of the queries and keys (shared by all heads,
    replicated on every tensor-parallel rank)."""

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0,
                 qkv_bias: bool | None = None, o_bias: bool | None = None) -> None:
        super().__init__(config, layer_idx, qkv_bias, o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query head through q_norm, each key head through k_norm."""
        return norm_heads(self.q_norm, q, self.head_dim), norm_heads(self.k_norm, k, self.head_dim)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """A LLaMA decoder layer with Qwen3's attention."""

    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense): LLaMA with q/k head norms; GGUF files without llama.cpp's q/k
    permutation (as Qwen2)."""

    gguf_rotary_permuted = False
    gguf_layer_names = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    decoder_layer_cls = Qwen3DecoderLayer
