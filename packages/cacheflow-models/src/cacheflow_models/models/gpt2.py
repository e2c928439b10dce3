"""GPT-2: learned absolute positions, pre-norm LayerNorm blocks, Conv1D weights, tied LM head.

Written by the recipe in docs/adding_a_new_model.md; HF's modeling_gpt2.py is the reference for
the math and the weight names. HF stores GPT-2's projections as Conv1D, whose weights are
[in_features, out_features]; they are transposed at load into the runtime's [out, in] layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.loading import StrictLoader, rename_gguf
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.layers.activation import get_act_fn
from cacheflow_runtime.layers.attention import GPTCacheFlowAttention, KVCache
from cacheflow_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cacheflow_runtime.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)


class GPT2Attention(nn.Module):
    """Multi-head self-attention with the fused c_attn projection ([q; k; v] after transposing)."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        head_size = hidden // total_heads
        self.c_attn = QKVParallelLinear(hidden, head_size, total_heads, total_heads, bias=True)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        scale = head_size ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.attn = GPTCacheFlowAttention(self.c_attn.num_heads, head_size, scale)

    def forward(self, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        qkv = self.c_attn(hidden_states)
        q_size = self.c_attn.q_size
        q, k, v = qkv.split([q_size, q_size, q_size], dim=-1)
        return self.c_proj(self.attn(q, k, v, kv_cache, input_metadata))


class GPT2MLP(nn.Module):
    """c_proj(act(c_fc(x))), c_fc split by output features, c_proj by input features."""

    def __init__(self, hidden_size: int, inner_size: int, activation: str) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(hidden_size, inner_size, bias=True)
        self.c_proj = RowParallelLinear(inner_size, hidden_size, bias=True)
        self.act = get_act_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        inner = getattr(config, "n_inner", None) or 4 * hidden
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(hidden, inner, config.activation_function)

    def forward(self, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """One block over the flattened batch."""
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), kv_cache,
                                                  input_metadata)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    """Token and position embeddings, the blocks and the final LayerNorm."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.wte = VocabParallelEmbedding(config.vocab_size, hidden)
        self.wpe = VocabParallelEmbedding(config.max_position_embeddings, hidden)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after ln_f."""
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for i, block in enumerate(self.h):
            hidden_states = block(hidden_states, kv_caches[i], input_metadata)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    """The runtime's model protocol for GPT-2 checkpoints (HF ``GPT2LMHeadModel``, or GGUF)."""

    # Conv1D weights, stored [in, out] in the checkpoint.
    conv1d_weights = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
    # Causal-mask buffers that older checkpoints carry and no parameter takes.
    ignored_weights = (".attn.bias", ".attn.masked_bias")

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention) is not supported")
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.transformer.wte)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] flattened over the batch -> hidden states."""
        return self.transformer(input_ids, positions, kv_caches, input_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [num_rows, vocab] for the given hidden states."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     weights_format: str = "safetensors") -> None:
        """Loads (name, tensor) pairs with HF names, with or without the ``transformer.`` prefix
        (llama.cpp names when ``weights_format`` is gguf).

        Raises WeightLoadError naming every missing, unexpected or misshapen tensor.
        """
        source = weights
        if weights_format == "gguf":
            # llama.cpp stores the Conv1D weights already transposed to [out, in] (transformers'
            # GPT2TensorProcessor transposes them back to Conv1D): map them to Conv1D layout.
            weights = rename_gguf(weights, _gguf_to_hf, _gguf_to_conv1d)
        optional = {"lm_head.weight"} if self.tie_word_embeddings else set()
        loader = StrictLoader(self, ignore=self.ignored_weights, optional=optional,
                              source=source)
        for name, tensor in weights:
            if name == "lm_head.weight":
                if self.tie_word_embeddings:
                    continue
            elif not name.startswith("transformer."):
                name = f"transformer.{name}"
            if name.endswith(self.conv1d_weights):
                tensor = tensor.t()
            loader.load_one(name, tensor)
        loader.finish()


_GGUF_LAYER_NAMES = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                   "output_norm": "transformer.ln_f", "output": "lm_head"}


def _gguf_to_hf(name: str) -> Optional[str]:
    """HF name of a llama.cpp GPT-2 tensor name (unknown names pass through, to be reported)."""
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"transformer.h.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{kind}"
    return name


def _gguf_to_conv1d(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """GGUF [out, in] projection weights to HF Conv1D's [in, out] (as transformers does)."""
    return tensor.t() if name.endswith(GPT2LMHeadModel.conv1d_weights) else tensor
