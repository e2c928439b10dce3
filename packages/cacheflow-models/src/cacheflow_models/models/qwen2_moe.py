"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention with a sparse MoE block plus a
shared expert.

From the config: ``num_experts`` routed experts of ``moe_intermediate_size``,
``num_experts_per_tok`` chosen per token (softmax over all experts, top-k, divided by their sum
only with ``norm_topk_prob``), a shared expert of ``shared_expert_intermediate_size`` whose output
is scaled by ``sigmoid(shared_expert_gate(x))`` (none when that size is 0), ``hidden_act`` in
every MLP, dense layers where ``mlp_only_layers`` or ``decoder_sparse_step`` say so, q/k/v
biases (``qkv_bias``), per-layer sliding windows (``layer_types``), GQA and tied embeddings.

HF's modeling_qwen2_moe.py is the reference for the math and the weight names.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from cacheflow_runtime.layers.fused_moe import FusedMoE
from cacheflow_runtime.layers.linear import ReplicatedLinear


def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` has the MoE block (else a dense MLP), as HF decides."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and int(config.num_experts) > 0 and (layer_idx + 1) % step == 0)


def shared_expert_size(config: PretrainedConfig) -> int:
    """Width of the shared expert (0: none, the sparse block is the routed experts alone)."""
    return int(getattr(config, "shared_expert_intermediate_size", 0) or 0)


class Qwen2MoeSparseMoeBlock(nn.Module):
    """Router, routed experts and the gated shared expert (if the config has one)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        num_experts = int(config.num_experts)
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, int(config.num_experts_per_tok),
                                config.hidden_size, int(config.moe_intermediate_size),
                                renormalize=bool(config.norm_topk_prob),
                                activation=config.hidden_act)
        shared = shared_expert_size(config)
        self.shared_expert = (LlamaMLP(config.hidden_size, shared, False, config.hidden_act)
                              if shared else None)
        self.shared_expert_gate = (ReplicatedLinear(config.hidden_size, 1, bias=False)
                                   if shared else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        out = self.experts(hidden_states, self.gate(hidden_states))
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(hidden_states))
            out = out + gate * self.shared_expert(hidden_states)
        return out


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    """LLaMA's block with the sparse MoE block (or a dense MLP) as its feed-forward part."""

    def build_mlp(self, config: PretrainedConfig, layer_idx: int) -> nn.Module:
        """The sparse block on MoE layers, a dense MLP of ``intermediate_size`` elsewhere."""
        if is_sparse_layer(config, layer_idx):
            return Qwen2MoeSparseMoeBlock(config)
        return LlamaMLP(config.hidden_size, config.intermediate_size, False, config.hidden_act)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """The runtime's model protocol for Qwen2-MoE checkpoints."""

    decoder_layer_cls = Qwen2MoeDecoderLayer
    o_bias = False
    gguf_rotary_permuted = False

    def __init__(self, config: PretrainedConfig) -> None:
        self.qkv_bias = bool(getattr(config, "qkv_bias", True))
        super().__init__(config)

    def weight_name_map(self) -> dict[str, tuple[str, object]]:
        """Per-expert ``mlp.experts.E.gate_proj/up_proj/down_proj`` onto the fused expert
        weights (before LLaMA's names, whose ``.gate_proj.`` would otherwise take them), then
        LLaMA's fused names, which also fuse the shared expert's gate and up."""
        experts = FusedMoE.checkpoint_names("experts", int(self.config.num_experts))
        return {**{f".mlp{k}": (f".mlp{v}", sid) for k, (v, sid) in experts.items()},
                **super().weight_name_map()}

    def skips_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """LLaMA's skips, and without a shared expert (``shared_expert_intermediate_size`` 0)
        the zero-width shared-expert tensors and the gate HF saves anyway: it scales a
        0-width MLP's output, which adds nothing. A shared-expert tensor with elements is left
        to the strict loader to refuse."""
        if super().skips_weight(name, tensor):
            return True
        if shared_expert_size(self.config) or ".mlp." not in name:
            return False
        return (".shared_expert_gate." in name
                or (".shared_expert." in name and tensor.numel() == 0))
