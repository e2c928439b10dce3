"""LLaMA and the models that share its layout: SmolLM2, Mistral, Qwen2.

From the config: GQA/MQA, tied embeddings, rope_theta, rope_scaling (linear, dynamic, llama3,
yarn), attention_bias / mlp_bias, head_dim other than hidden / heads, and sliding-window attention
(Mistral's ``sliding_window``; Qwen2's ``layer_types`` choose which layers use it).

Written by the recipe in docs/adding_a_new_model.md; HF's modeling_llama.py is the reference for
the math and the weight names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from cacheflow_models.hf_config import rope_settings
from cacheflow_models.loading import StrictLoader, rename_gguf, unpermute_gguf_rotary
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.layers.activation import GeluAndMul, SiluAndMul
from cacheflow_runtime.layers.attention import GPTNeoXCacheFlowAttention, KVCache
from cacheflow_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cacheflow_runtime.layers.layernorm import RMSNorm
from cacheflow_runtime.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    stream_fusion_applies,
)

# HF activation names of gated MLPs -> the fused gate * up layer.
_GATED_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
    "gelu": lambda: GeluAndMul("none"),
}


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one column-parallel matrix.

    ``act`` is the config's activation name: silu (LLaMA, Phi-3), gelu_pytorch_tanh (Gemma's
    GeGLU) or gelu.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool,
                 act: str = "silu") -> None:
        super().__init__()
        if act not in _GATED_ACTIVATIONS:
            raise ValueError(f"MLP activation {act!r} is not supported; supported: "
                             f"{sorted(_GATED_ACTIVATIONS)}")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)
        self.act_fn = _GATED_ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        return self.down_proj.forward_gated(self.gate_up_proj(x), self.act_fn)


def sliding_window(config: PretrainedConfig, layer_idx: int) -> Optional[int]:
    """The attention window of layer ``layer_idx`` (None: the whole context), as HF reads it.

    Mistral applies ``sliding_window`` to every layer; configs with ``layer_types`` (Qwen2)
    apply it to the layers marked "sliding_attention" only.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None
                          and layer_types[layer_idx] != "sliding_attention"):
        return None
    return int(window)


class LlamaAttention(nn.Module):
    """Self-attention with rotary embeddings and grouped KV heads over the paged cache.

    ``qkv_bias`` / ``o_bias``: None takes ``config.attention_bias`` (LLaMA); Qwen2 has biases on
    q, k and v but not on the output projection.

    Subclasses change what the attention layer takes of the config (:meth:`attention_options`:
    scale, rotary, window, soft cap) and may normalise q and k per head (:meth:`norm_qk`).
    """

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0,
                 qkv_bias: Optional[bool] = None, o_bias: Optional[bool] = None) -> None:
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = bias if qkv_bias is None else qkv_bias
        o_bias = bias if o_bias is None else o_bias
        self.head_dim = head_dim
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, o_bias)
        self.attn = GPTNeoXCacheFlowAttention(
            self.qkv_proj.num_heads, head_dim, is_neox_style=True,
            num_kv_heads=self.qkv_proj.num_kv_heads,
            **self.attention_options(config, layer_idx, head_dim))

    def attention_options(self, config: PretrainedConfig, layer_idx: int,
                          head_dim: int) -> dict[str, Any]:
        """Keyword arguments of the attention layer: scale, rotary_dim, max_position, base,
        rope_scaling, sliding_window (and logits_soft_cap where a model has one)."""
        theta, scaling = rope_settings(config)
        return dict(scale=head_dim ** -0.5, rotary_dim=head_dim,
                    max_position=config.max_position_embeddings, base=theta,
                    rope_scaling=scaling, sliding_window=sliding_window(config, layer_idx))

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k before the rotary embedding (unchanged here; Qwen3 and Gemma 3 normalise each
        head)."""
        return q, k

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        qkv = self.qkv_proj(hidden_states)
        return self.o_proj(self.attend(positions, qkv, kv_cache, input_metadata))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: KVCache,
               input_metadata: InputMetadata) -> torch.Tensor:
        """The attention between the two projections: [num_tokens, q + 2 kv] (this rank's
        heads) -> [num_tokens, q] (the input of ``o_proj``)."""
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = self.norm_qk(q, k)
        return self.attn(positions, q, k, v, kv_cache, input_metadata)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Subclasses set ``attention_cls`` (LlamaAttention or a subclass: Qwen3's q/k norms, Phi-3's
    partial rotary) and ``norm_cls`` (Gemma's (1 + weight) RMSNorm), and may return another
    feed-forward block from :meth:`build_mlp`.
    """

    attention_cls: type[LlamaAttention] = LlamaAttention
    norm_cls: Callable[[int, float], nn.Module] = RMSNorm

    def __init__(self, config: PretrainedConfig, layer_idx: int = 0,
                 qkv_bias: Optional[bool] = None, o_bias: Optional[bool] = None) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_idx, qkv_bias, o_bias)
        self.mlp = self.build_mlp(config, layer_idx)
        self.input_layernorm = self.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = self.norm_cls(config.hidden_size, config.rms_norm_eps)

    def build_mlp(self, config: PretrainedConfig, layer_idx: int) -> nn.Module:
        """The feed-forward block of layer ``layer_idx`` ([num_tokens, hidden] -> same shape):
        the gated MLP with the config's ``hidden_act`` (mixture-of-experts subclasses return
        their sparse block here)."""
        return LlamaMLP(config.hidden_size, config.intermediate_size,
                        bool(getattr(config, "mlp_bias", False)),
                        getattr(config, "hidden_act", "silu"))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """One block over the flattened batch."""
        out, residual = self.forward_with_residual(positions, hidden_states, None, kv_cache,
                                                   input_metadata)
        return residual + out

    def forward_with_residual(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                              residual: Optional[torch.Tensor], kv_cache: KVCache,
                              input_metadata: InputMetadata
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block whose input is ``residual + hidden_states`` (``hidden_states`` alone when
        ``residual`` is None); returns ``(out, new_residual)`` whose sum is the block's
        output. Leaving that last sum to the next block lets its input norm add it in the fused
        add-and-norm kernel, as this block's post-attention norm does; the sums are rounded
        to the dtype before each norm, as HF computes them. Both arguments may be
        overwritten."""
        if residual is None:
            residual = hidden_states
            normed = self.input_layernorm(hidden_states)
        else:
            normed, residual = self.input_layernorm(hidden_states, residual)
        attn = self.self_attn(positions, normed, kv_cache, input_metadata)
        normed, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(normed), residual

    def forward_stream(self, positions: torch.Tensor, stream: torch.Tensor, kv_cache: KVCache,
                       input_metadata: InputMetadata) -> torch.Tensor:
        """One block on the residual stream itself: returns the block's output (the input plus
        the attention's and the MLP's contributions, each rounded to the dtype before its add,
        as :meth:`forward_with_residual` adds them). The norms go into the qkv and gate_up
        projections and the adds into the o and down projections, which for one row on Hopper
        are one kernel each (``CACHEFLOW_SKINNY_FUSE=1``; see LlamaModel). ``stream`` may be
        overwritten."""
        attn = self.self_attn
        qkv = attn.qkv_proj.forward_normed(stream, self.input_layernorm)
        stream = attn.o_proj.forward_residual(
            attn.attend(positions, qkv, kv_cache, input_metadata), stream)
        gate_up = self.mlp.gate_up_proj.forward_normed(stream, self.post_attention_layernorm)
        return self.mlp.down_proj.forward_gated_residual(gate_up, self.mlp.act_fn, stream)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm.

    ``layer_cls(config, layer_idx, qkv_bias, o_bias)`` builds each decoder layer (default
    LlamaDecoderLayer); ``norm_cls`` is the final norm (Gemma's (1 + weight) RMSNorm);
    ``embed_scale`` multiplies the embeddings, rounded to their dtype first as HF does (Gemma:
    sqrt(hidden_size)).
    """

    def __init__(self, config: PretrainedConfig, qkv_bias: Optional[bool] = None,
                 o_bias: Optional[bool] = None,
                 layer_cls: Optional[Callable[..., nn.Module]] = None,
                 norm_cls: Callable[[int, float], nn.Module] = RMSNorm,
                 embed_scale: Optional[float] = None) -> None:
        super().__init__()
        layer_cls = layer_cls or LlamaDecoderLayer
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i, qkv_bias, o_bias)
                                    for i in range(config.num_hidden_layers))
        self.norm = norm_cls(config.hidden_size, config.rms_norm_eps)
        # Residual sums handed from block to block (fused into the norms) when every block is
        # the plain pre-norm block with RMSNorm norms; else each block returns its output.
        self.carries_residual = isinstance(self.norm, RMSNorm) and all(
            type(layer).forward is LlamaDecoderLayer.forward
            and type(layer).forward_with_residual is LlamaDecoderLayer.forward_with_residual
            and isinstance(layer.input_layernorm, RMSNorm)
            and isinstance(layer.post_attention_layernorm, RMSNorm) for layer in self.layers)
        # Blocks that can run on the residual stream (forward_stream): the plain block with the
        # plain attention forward, the gated MLP and plain RMSNorms.
        self.streams = self.carries_residual and all(
            type(layer.self_attn).forward is LlamaAttention.forward
            and type(layer.mlp) is LlamaMLP
            and type(layer.input_layernorm) is RMSNorm
            and type(layer.post_attention_layernorm) is RMSNorm for layer in self.layers)
        self.embed_scale: Optional[torch.Tensor]
        self.register_buffer("embed_scale", None if embed_scale is None
                             else torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        hidden_states = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden_states = hidden_states * self.embed_scale.to(hidden_states.dtype)
        if not self.carries_residual:
            for i, layer in enumerate(self.layers):
                hidden_states = layer(positions, hidden_states, kv_caches[i], input_metadata)
            return self.norm(hidden_states)
        if self._runs_on_the_stream(hidden_states):
            for i, layer in enumerate(self.layers):
                hidden_states = layer.forward_stream(positions, hidden_states, kv_caches[i],
                                                     input_metadata)
            return self.norm(hidden_states)
        residual: Optional[torch.Tensor] = None
        for i, layer in enumerate(self.layers):
            hidden_states, residual = layer.forward_with_residual(
                positions, hidden_states, residual, kv_caches[i], input_metadata)
        return self.norm(hidden_states, residual)[0]

    def _runs_on_the_stream(self, hidden_states: torch.Tensor) -> bool:
        """Whether this step's blocks run on the residual stream with their norms and adds inside
        the GEMMs (blocks that allow it, and ``stream_fusion_applies``)."""
        return self.streams and stream_fusion_applies(
            hidden_states, self.layers[0].self_attn.qkv_proj.weight)


class LlamaForCausalLM(nn.Module):
    """The runtime's model protocol for LLaMA-layout checkpoints."""

    # Checkpoint name fragment -> (fused parameter fragment, shard id).
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }
    # Buffers some checkpoints carry that no parameter takes.
    ignored_weights = ("rotary_emb.inv_freq",)
    # Attention biases (q/k/v, output); None: config.attention_bias decides.
    qkv_bias: Optional[bool] = None
    o_bias: Optional[bool] = None
    # llama.cpp's converter permutes the q/k rows of LLaMA-family GGUF files (not of Qwen2's).
    gguf_rotary_permuted = True
    # llama.cpp per-layer tensor name -> HF name under model.layers.N (see _gguf_to_hf).
    gguf_layer_names: dict[str, str] = {}
    # The decoder layer (subclasses swap its attention or feed-forward block).
    decoder_layer_cls: Callable[..., nn.Module] = LlamaDecoderLayer

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def build_model(self, config: PretrainedConfig) -> nn.Module:
        """The embedding, decoder layers and final norm (``self.model``)."""
        return LlamaModel(config, self.qkv_bias, self.o_bias, self.decoder_layer_cls)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], input_metadata: InputMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] flattened over the batch -> hidden states."""
        return self.model(input_ids, positions, kv_caches, input_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [num_rows, vocab] for the given hidden states."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     weights_format: str = "safetensors") -> None:
        """Loads (name, tensor) pairs with HF names (GGUF names when ``weights_format`` is gguf).

        Raises WeightLoadError naming every missing, unexpected or misshapen tensor.
        """
        source = weights
        if weights_format == "gguf":
            weights = rename_gguf(weights, self.gguf_name_to_hf, self.gguf_tensor)
        optional = {"lm_head.weight"} if self.tie_word_embeddings else set()
        loader = StrictLoader(self, self.weight_name_map(), self.ignored_weights, optional,
                              source=source)
        for name, tensor in weights:
            if not self.skips_weight(name, tensor):
                loader.load_one(name, tensor)
        loader.finish()

    def skips_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether checkpoint tensor ``name`` (HF name) is left unloaded on purpose: the LM
        head when it is tied to the embedding."""
        return self.tie_word_embeddings and name == "lm_head.weight"

    def weight_name_map(self) -> dict[str, tuple[str, object]]:
        """The StrictLoader ``stacked`` entries: checkpoint fragment -> (parameter fragment,
        shard id); subclasses with expert weights put theirs first."""
        return dict(self.stacked_params)

    def gguf_name_to_hf(self, name: str) -> Optional[str]:
        """HF name of a llama.cpp tensor name (None: a tensor HF does not load either)."""
        return _gguf_to_hf(name, {**_GGUF_LAYER_NAMES, **self.gguf_layer_names})

    def gguf_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A GGUF tensor (already under its HF ``name``) in HF's layout: q/k rows unpermuted
        where llama.cpp permuted them."""
        if not self.gguf_rotary_permuted:
            return tensor
        if name.endswith("q_proj.weight"):
            return unpermute_gguf_rotary(tensor, self.config.num_attention_heads)
        if name.endswith("k_proj.weight"):
            heads = getattr(self.config, "num_key_value_heads", None)
            return unpermute_gguf_rotary(tensor, heads or self.config.num_attention_heads)
        return tensor


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the LLaMA layout with sliding-window attention (``config.sliding_window``)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: the LLaMA layout with biases on q, k and v (none on o_proj); per-layer sliding
    windows from ``config.layer_types``; GGUF files without llama.cpp's q/k permutation."""

    qkv_bias = True
    o_bias = False
    gguf_rotary_permuted = False


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}


# Tensors llama.cpp writes that HF's GGUF loader does not load: rotary frequencies HF computes
# from the config (rope_freqs; Phi-3's longrope factors, which HF reads from no GGUF key).
_GGUF_SKIPPED = ("rope_freqs", "rope_factors_long", "rope_factors_short")


def _gguf_to_hf(name: str, layer_names: dict[str, str]) -> Optional[str]:
    """HF name of a llama.cpp tensor name (None for tensors in _GGUF_SKIPPED); names it does
    not know come back unchanged, for the strict loader to report."""
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_SKIPPED:
        return None
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{kind}"
    return name
