"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share its layout): the LLaMA block with the query, key
and value projections stored fused (``self_attn.qkv_proj``, rows [q; k; v]) and the gate and up
projections too (``mlp.gate_up_proj``, rows [gate; up]), rotary on the first
``partial_rotary_factor`` of each head, ``longrope`` / ``su`` rope scaling (see
cacheflow_runtime.layers.rotary_embedding) and an optional ``sliding_window`` on every layer.

GGUF files: llama.cpp stores longrope factors as tensors (``rope_factors_long`` / ``_short``)
and HF transformers' GGUF loader reads neither them nor a rope scaling type, so both HF and this
port run such a file with plain rotary (exact within the original context length only).

HF's modeling_phi3.py is the reference for the math and the weight names.

longrope and the KV cache: each step's new tokens are rotated with the factors of their
sequence's length at that step and cached keys keep theirs, as HF's model computes step by step
with a cache. HF's ``generate`` for Phi-3 additionally drops its cache once, when a sequence
first grows past ``original_max_position_embeddings``, and recomputes it with the long factors;
the engine does not, so a sequence that crosses that length while generating continues from
short-factor keys (prompts already longer than it, and sequences that stay within it, are
exactly HF's).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from cacheflow_models.hf_config import partial_rotary_factor
from cacheflow_models.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Phi3Attention(LlamaAttention):
    """LLaMA attention with partial rotary."""

    def attention_options(self, config: PretrainedConfig, layer_idx: int,
                          head_dim: int) -> dict[str, Any]:
        """LLaMA's options with ``rotary_dim = int(head_dim * partial_rotary_factor)``."""
        options = super().attention_options(config, layer_idx, head_dim)
        options["rotary_dim"] = int(head_dim * partial_rotary_factor(config))
        return options


class Phi3DecoderLayer(LlamaDecoderLayer):
    """A LLaMA decoder layer with Phi-3's attention."""

    attention_cls = Phi3Attention


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3: the checkpoint's fused qkv_proj and gate_up_proj are loaded whole (each rank
    takes its heads and its rows of both halves)."""

    stacked_params: dict[str, tuple[str, object]] = {}
    # llama.cpp keeps the fusions (attn_qkv; ffn_up holds [gate; up]) and rotates in neox style.
    gguf_rotary_permuted = False
    gguf_layer_names = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
    qkv_bias = False
    o_bias = False
    decoder_layer_cls = Phi3DecoderLayer
