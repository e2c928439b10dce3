"""StableLM (stablelm-2, stablelm-3b-4e1t): LayerNorm, partial rotary, optional q/k/v biases,
sequential or parallel residual, a SiLU-gated MLP.

HF's modeling_stablelm.py is the reference for the math and the weight names. Written with
cacheflow's layers (tensor-parallel aware) and loading helpers only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.hf_config import rope_settings
from cacheflow_models.loading import StrictLoader, rename_gguf
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.layers.activation import SiluAndMul
from cacheflow_runtime.layers.attention import GPTNeoXCacheFlowAttention, KVCache
from cacheflow_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cacheflow_runtime.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)


def partial_rotary_factor(config: PretrainedConfig) -> float:
    """The fraction of each head that rotary embeddings rotate (transformers 4 and 5 configs)."""
    params: dict[str, Any] = getattr(config, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor",
                            getattr(config, "partial_rotary_factor", 0.25)))


class StableLmAttention(nn.Module):
    """Self-attention with rotary embeddings on the first part of each head."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if getattr(config, "qk_layernorm", False):
            raise ValueError("StableLM configs with qk_layernorm=True (per-head q/k LayerNorms) "
                             "are not supported by cacheflow-stablelm")
        hidden, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, kv_heads,
                                          bool(config.use_qkv_bias))
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, bias=False)
        theta, scaling = rope_settings(config)
        self.attn = GPTNeoXCacheFlowAttention(
            self.qkv_proj.num_heads, head_dim, head_dim ** -0.5,
            rotary_dim=int(head_dim * partial_rotary_factor(config)),
            max_position=config.max_position_embeddings, base=theta, is_neox_style=True,
            num_kv_heads=self.qkv_proj.num_kv_heads, rope_scaling=scaling)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        sizes = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]
        q, k, v = self.qkv_proj(hidden_states).split(sizes, dim=-1)
        return self.o_proj(self.attn(positions, q, k, v, kv_cache, input_metadata))


class StableLmMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=False)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class StableLmDecoderLayer(nn.Module):
    """x + attn(ln1(x)) + mlp(ln1(x)) (parallel residual) or two sequential residual steps."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.use_parallel_residual = bool(config.use_parallel_residual)
        self.self_attn = StableLmAttention(config)
        self.mlp = StableLmMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = (
            None if self.use_parallel_residual
            else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """One block over the flattened batch."""
        normed = self.input_layernorm(hidden_states)
        attn = self.self_attn(positions, normed, kv_cache, input_metadata)
        if self.post_attention_layernorm is None:
            return hidden_states + attn + self.mlp(normed)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class StableLmModel(nn.Module):
    """Embedding, decoder layers and the final LayerNorm."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(StableLmDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[Optional[KVCache]], input_metadata: InputMetadata
                ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        hidden_states = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden_states = layer(positions, hidden_states, kv_cache, input_metadata)
        return self.norm(hidden_states)


class StableLmForCausalLM(nn.Module):
    """cacheflow's model protocol for StableLM checkpoints."""

    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
    }
    ignored_weights = ("rotary_emb.inv_freq",)

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.model = StableLmModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[Optional[KVCache]], input_metadata: InputMetadata
                ) -> torch.Tensor:
        """input_ids, positions: [num_tokens] flattened over the batch -> hidden states."""
        return self.model(input_ids, positions, kv_caches, input_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [num_rows, vocab]."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     weights_format: str = "safetensors") -> None:
        """Loads HF-named tensors strictly (WeightLoadError names any mismatch)."""
        source = weights
        if weights_format == "gguf":
            weights = rename_gguf(weights, gguf_to_hf)
        optional = {"lm_head.weight"} if self.tie_word_embeddings else set()
        loader = StrictLoader(self, self.stacked_params, self.ignored_weights, optional,
                              source=source)
        for name, tensor in weights:
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            loader.load_one(name, tensor)
        loader.finish()


# llama.cpp's names of StableLM tensors (its converter keeps HF's q/k row order).
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}


def gguf_to_hf(name: str) -> str:
    """HF name of a llama.cpp StableLM tensor name (unknown names pass through, so that the
    strict loader reports them)."""
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{kind}"
    return name
