"""A tiny model built from the runtime's tensor-parallel layers only (no cacheflow_models), for
the executor tests: GQA with a single KV head (fewer KV heads than ranks: replicated), a
vocabulary of 37 (not divisible by 2), biases on every split layer. Loaded by import path
(``tp_testmodel:TinyTPModel``), also in spawned worker processes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from torch import nn

from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.config import ModelConfig
from cacheflow_runtime.layers.attention import GPTNeoXCacheFlowAttention, KVCache
from cacheflow_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cacheflow_runtime.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)

ARCHITECTURE = "tp_testmodel:TinyTPModel"


def tiny_config(**overrides: int) -> SimpleNamespace:
    """The model's shape: 4 query heads of 8, ``num_kv_heads`` 1, hidden 32, 2 layers."""
    settings = dict(vocab_size=37, hidden_size=32, num_heads=4, num_kv_heads=1, head_size=8,
                    intermediate_size=48, num_layers=2, max_position=64)
    settings.update(overrides)
    return SimpleNamespace(**settings)


class TinyLayer(nn.Module):
    """x + attn(x), then x + down(tanh(up(x)))."""

    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.qkv = QKVParallelLinear(c.hidden_size, c.head_size, c.num_heads, c.num_kv_heads)
        self.o = RowParallelLinear(c.num_heads * c.head_size, c.hidden_size)
        self.attn = GPTNeoXCacheFlowAttention(
            self.qkv.num_heads, c.head_size, c.head_size ** -0.5, rotary_dim=c.head_size,
            max_position=c.max_position, num_kv_heads=self.qkv.num_kv_heads)
        self.up = ColumnParallelLinear(c.hidden_size, c.intermediate_size)
        self.down = RowParallelLinear(c.intermediate_size, c.hidden_size)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache,
                metadata: InputMetadata) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.qkv.q_size, self.qkv.kv_size, self.qkv.kv_size], -1)
        x = x + self.o(self.attn(positions, q, k, v, kv_cache, metadata))
        return x + self.down(torch.tanh(self.up(x)))


class TinyTPModel(nn.Module):
    """The runtime's model protocol over the layers above."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyLayer(config) for _ in range(config.num_layers))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden]."""
        x = self.embed(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(positions, x, cache, input_metadata)
        return x

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (gathered from every rank)."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     weights_format: str = "safetensors") -> None:
        """Full checkpoint tensors under the parameter names; each layer keeps its shard."""
        params = dict(self.named_parameters())
        for name, tensor in weights:
            param = params.pop(name)
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        assert not params, f"not in the checkpoint: {sorted(params)}"


def save_tiny_tp_checkpoint(path: Path, config: SimpleNamespace, seed: int = 0) -> Path:
    """Random full-size weights of the model (as a single rank holds them) in safetensors."""
    torch.manual_seed(seed)
    model = TinyTPModel(config)
    tensors = {}
    for name, param in model.named_parameters():
        tensors[name] = torch.randn(param.shape) * 0.3
    # rows of the padded vocabulary never exist in a checkpoint
    tensors["embed.weight"] = torch.randn(config.vocab_size, config.hidden_size)
    tensors["lm_head.weight"] = torch.randn(config.vocab_size, config.hidden_size) * 0.5
    tensors["lm_head.bias"] = torch.randn(config.vocab_size) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def tiny_model_config(path: Path, config: SimpleNamespace) -> ModelConfig:
    """The runtime's view of the checkpoint at ``path``."""
    return ModelConfig(model_path=str(path), architecture=ARCHITECTURE, hf_config=config,
                       num_layers=config.num_layers, num_attention_heads=config.num_heads,
                       num_kv_heads=config.num_kv_heads, head_size=config.head_size,
                       hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                       max_model_len=config.max_position, dtype=torch.float32,
                       weights_format="safetensors")
