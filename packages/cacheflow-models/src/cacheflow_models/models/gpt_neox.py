"""GPT-NeoX (Pythia and friends): partial rotary, parallel or sequential residual, fused QKV laid
out per head, untied ``embed_out`` head.

Written by the recipe in docs/adding_a_new_model.md; HF's modeling_gpt_neox.py is the reference
for the math and the weight names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.hf_config import rope_settings
from cacheflow_models.loading import StrictLoader
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.layers.activation import get_act_fn
from cacheflow_runtime.layers.attention import GPTNeoXCacheFlowAttention, KVCache
from cacheflow_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cacheflow_runtime.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)


def neox_rotary_settings(config: PretrainedConfig
                         ) -> tuple[float, float, Optional[dict[str, Any]]]:
    """(partial_rotary_factor, rope_theta, rope_scaling or None) of a GPT-NeoX config.

    transformers 5 keeps the first two in ``rope_parameters``; transformers 4 configs name them
    ``rotary_pct`` and ``rotary_emb_base``.
    """
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "rotary_pct", None))
    theta, scaling = rope_settings(config)
    if "rope_theta" not in params and getattr(config, "rotary_emb_base", None) is not None:
        theta = float(config.rotary_emb_base)
    return (1.0 if factor is None else float(factor)), theta, scaling


def neox_qkv_to_stacked(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorders a fused query_key_value weight or bias from HF's per-head layout
    [heads, 3, head_size, ...] to the [q; k; v] layout QKVParallelLinear loads."""
    rest = tensor.shape[1:]
    per_head = tensor.reshape(num_heads, 3, -1, *rest)
    return per_head.transpose(0, 1).reshape(tensor.shape)


class GPTNeoXAttention(nn.Module):
    """Self-attention with rotary embeddings on the first ``rotary_pct`` of each head."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        head_size = hidden // total_heads
        bias = bool(getattr(config, "attention_bias", True))
        self.query_key_value = QKVParallelLinear(hidden, head_size, total_heads, total_heads, bias)
        self.dense = RowParallelLinear(hidden, hidden, bias)
        factor, theta, scaling = neox_rotary_settings(config)
        rotary_dim = int(head_size * factor)
        self.attn = GPTNeoXCacheFlowAttention(
            self.query_key_value.num_heads, head_size, head_size ** -0.5, rotary_dim=rotary_dim,
            max_position=config.max_position_embeddings, base=theta, is_neox_style=True,
            rope_scaling=scaling)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        qkv = self.query_key_value(hidden_states)
        q_size = self.query_key_value.q_size
        q, k, v = qkv.split([q_size, q_size, q_size], dim=-1)
        out = self.attn(positions, q, k, v, kv_cache, input_metadata)
        return self.dense(out)


class GPTNeoXMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x)))."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    """Parallel residual x + attn(ln1(x)) + mlp(ln2(x)), or sequential like a pre-norm block."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.use_parallel_residual = bool(getattr(config, "use_parallel_residual", True))
        eps = config.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = GPTNeoXAttention(config)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """One block over the flattened batch."""
        attn_output = self.attention(positions, self.input_layernorm(hidden_states), kv_cache,
                                     input_metadata)
        if self.use_parallel_residual:
            mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
            return mlp_output + attn_output + hidden_states
        attn_output = attn_output + hidden_states
        return self.mlp(self.post_attention_layernorm(attn_output)) + attn_output


class GPTNeoXModel(nn.Module):
    """Embedding, layers and the final LayerNorm."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final LayerNorm."""
        hidden_states = self.embed_in(input_ids)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(positions, hidden_states, kv_caches[i], input_metadata)
        return self.final_layer_norm(hidden_states)


class GPTNeoXForCausalLM(nn.Module):
    """The runtime's model protocol for GPT-NeoX checkpoints."""

    # Causal-mask and rotary buffers that older checkpoints carry and no parameter takes.
    ignored_weights = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.embed_out.tie_to(self.gpt_neox.embed_in)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] flattened over the batch -> hidden states."""
        return self.gpt_neox(input_ids, positions, kv_caches, input_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [num_rows, vocab] for the given hidden states."""
        return self.embed_out.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     weights_format: str = "safetensors") -> None:
        """Loads (name, tensor) pairs with HF names (the head as ``embed_out`` or ``lm_head``).

        Raises WeightLoadError naming every missing, unexpected or misshapen tensor.
        """
        if weights_format == "gguf":
            raise ValueError("GGUF checkpoints are not supported for GPT-NeoX")
        optional = {"embed_out.weight"} if self.tie_word_embeddings else set()
        loader = StrictLoader(self, ignore=self.ignored_weights, optional=optional,
                              source=weights)
        heads = self.config.num_attention_heads
        for name, tensor in weights:
            if name.startswith("lm_head."):
                name = "embed_out." + name[len("lm_head."):]
            if name == "embed_out.weight" and self.tie_word_embeddings:
                continue
            if (".attention.query_key_value." in name and tensor.dim() > 0
                    and tensor.shape[0] % (3 * heads) == 0):
                # (a misshapen tensor, or a scalar such as a KV-cache scale, goes through as is;
                # the loader names what it does not take)
                tensor = neox_qkv_to_stacked(tensor, heads)
            loader.load_one(name, tensor)
        loader.finish()
