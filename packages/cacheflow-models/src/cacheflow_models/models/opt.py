"""OPT: learned positions offset by 2, pre-norm or post-norm (350m) blocks, optional projections
between a narrower word-embedding width and the hidden size, tied LM head.

Written by the recipe in docs/adding_a_new_model.md; HF's modeling_opt.py is the reference for
the math and the weight names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.loading import StrictLoader
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.layers.activation import get_act_fn
from cacheflow_runtime.layers.attention import GPTCacheFlowAttention, KVCache
from cacheflow_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cacheflow_runtime.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

# OPT's position table has two extra leading rows: position p is row p + 2.
POSITION_OFFSET = 2


def _layer_norm(config: PretrainedConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size,
                        elementwise_affine=bool(getattr(config, "layer_norm_elementwise_affine",
                                                        True)))


class OPTAttention(nn.Module):
    """Multi-head self-attention; like HF, the query is scaled right after its projection."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        head_size = hidden // total_heads
        bias = bool(getattr(config, "enable_bias", True))
        self.qkv_proj = QKVParallelLinear(hidden, head_size, total_heads, total_heads, bias)
        self.out_proj = RowParallelLinear(hidden, hidden, bias)
        self.scaling = head_size ** -0.5
        self.attn = GPTCacheFlowAttention(self.qkv_proj.num_heads, head_size, 1.0)

    def forward(self, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        qkv = self.qkv_proj(hidden_states)
        q_size = self.qkv_proj.q_size
        q, k, v = qkv.split([q_size, q_size, q_size], dim=-1)
        out = self.attn(q * self.scaling, k, v, kv_cache, input_metadata)
        return self.out_proj(out)


class OPTDecoderLayer(nn.Module):
    """Attention and fc1/fc2 MLP, each with a residual; LayerNorm before (pre-LN) or after them."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        bias = bool(getattr(config, "enable_bias", True))
        self.do_layer_norm_before = bool(config.do_layer_norm_before)
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = _layer_norm(config)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias)
        self.activation_fn = get_act_fn(config.activation_function)
        self.final_layer_norm = _layer_norm(config)

    def forward(self, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """One block over the flattened batch."""
        pre = self.do_layer_norm_before
        residual = hidden_states
        if pre:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states, kv_cache, input_metadata)
        if not pre:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        residual = hidden_states
        if pre:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = residual + self.fc2(self.activation_fn(self.fc1(hidden_states)))
        if not pre:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class OPTDecoder(nn.Module):
    """Embeddings (with project_in), decoder layers, final LayerNorm (pre-LN only), project_out."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        word_dim = getattr(config, "word_embed_proj_dim", None) or hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, word_dim)
        self.embed_positions = VocabParallelEmbedding(
            config.max_position_embeddings + POSITION_OFFSET, hidden)
        if word_dim != hidden:
            self.project_in: Optional[ReplicatedLinear] = ReplicatedLinear(word_dim, hidden,
                                                                           bias=False)
            self.project_out: Optional[ReplicatedLinear] = ReplicatedLinear(hidden, word_dim,
                                                                            bias=False)
        else:
            self.project_in = self.project_out = None
        # _remove_final_layer_norm only keeps checkpoints fine-tuned before transformers 4.20.1
        # loading; HF builds the final LayerNorm for pre-LN models otherwise.
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            self.final_layer_norm: Optional[nn.LayerNorm] = _layer_norm(config)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, word_embed_proj_dim] ready for the LM head."""
        inputs_embeds = self.embed_tokens(input_ids)
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        hidden_states = inputs_embeds + self.embed_positions(positions + POSITION_OFFSET)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, kv_caches[i], input_metadata)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states


class OPTModel(nn.Module):
    """Holds the decoder (HF's ``model.decoder`` naming)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """See OPTDecoder.forward."""
        return self.decoder(input_ids, positions, kv_caches, input_metadata)


class OPTForCausalLM(nn.Module):
    """The runtime's model protocol for OPT checkpoints."""

    # Checkpoint name fragment -> (fused parameter fragment, shard id).
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
    }
    # OPT checkpoints carry no buffers; nothing is ignored.
    ignored_weights: tuple[str, ...] = ()

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        word_dim = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.model = OPTModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, word_dim)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.decoder.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] flattened over the batch -> hidden states."""
        return self.model(input_ids, positions, kv_caches, input_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [num_rows, vocab] for the given hidden states."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     weights_format: str = "safetensors") -> None:
        """Loads (name, tensor) pairs with HF names (``model.decoder.*`` or, as in the original
        metaseq conversions, ``decoder.*``).

        Raises WeightLoadError naming every missing, unexpected or misshapen tensor.
        """
        if weights_format == "gguf":
            raise ValueError("GGUF checkpoints are not supported for OPT")
        optional = {"lm_head.weight"} if self.tie_word_embeddings else set()
        loader = StrictLoader(self, self.stacked_params, self.ignored_weights, optional,
                              source=weights)
        for name, tensor in weights:
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if name.startswith("decoder."):
                name = f"model.{name}"
            loader.load_one(name, tensor)
        loader.finish()
