"""Mixtral: the Mistral layout with a sparse mixture-of-experts block in every layer.

From the config: ``num_local_experts`` experts of ``intermediate_size``, ``num_experts_per_tok``
chosen per token (softmax over all router logits, top-k, renormalised: a softmax over the top-k
logits), GQA/MQA, tied embeddings, rope settings and Mistral's ``sliding_window``. The experts
are sharded by tensor parallelism like the dense MLP (``cacheflow_runtime.layers.fused_moe``).

HF's modeling_mixtral.py is the reference for the math; checkpoints name the block
``block_sparse_moe`` with per-expert ``w1`` (gate), ``w3`` (up) and ``w2`` (down).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from cacheflow_runtime.layers.fused_moe import FusedMoE
from cacheflow_runtime.layers.linear import ReplicatedLinear


class MixtralSparseMoeBlock(nn.Module):
    """Router (``gate``, held whole by every rank) and the experts."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        num_experts = int(config.num_local_experts)
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, int(config.num_experts_per_tok),
                                config.hidden_size, config.intermediate_size,
                                renormalize=True, activation=config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        return self.experts(hidden_states, self.gate(hidden_states))


class MixtralDecoderLayer(LlamaDecoderLayer):
    """LLaMA's block with the sparse MoE block as its feed-forward part."""

    def build_mlp(self, config: PretrainedConfig, layer_idx: int) -> nn.Module:
        """Mixtral's sparse block (the layer's ``mlp``; checkpoints name it
        ``block_sparse_moe``)."""
        return MixtralSparseMoeBlock(config)


class MixtralForCausalLM(LlamaForCausalLM):
    """The runtime's model protocol for Mixtral checkpoints."""

    decoder_layer_cls = MixtralDecoderLayer

    def weight_name_map(self) -> dict[str, tuple[str, object]]:
        """Per-expert ``block_sparse_moe.experts.E.w1/w3/w2`` onto the fused expert weights
        (the block is the layer's ``mlp``), ``block_sparse_moe.gate`` onto the router, then
        LLaMA's fused attention names."""
        experts = FusedMoE.checkpoint_names("experts", int(self.config.num_local_experts),
                                            gate="w1", up="w3", down="w2")
        # Checkpoints name the block block_sparse_moe; transformers 5's own modules say mlp
        # (and hold the fused gate_up_proj / down_proj, shard id None).
        entries = {f"{prefix}{fragment}": (f".mlp{fused}", sid)
                   for fragment, (fused, sid) in experts.items()
                   for prefix in ((".block_sparse_moe", ".mlp") if sid is None
                                  else (".block_sparse_moe",))}
        entries[".block_sparse_moe."] = (".mlp.", None)
        return {**entries, **super().weight_name_map()}
