"""Tiny random checkpoints for tests: an HF model saved with save_pretrained plus a byte tokenizer.

Nothing is downloaded: the config is built here, the weights are random, and the tokenizer
maps each byte to one token (ids 0-2 are the special tokens <unk>, <s>, </s>).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: one token per byte, 259 tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")


LLAMA_VARIANTS: dict[str, dict[str, Any]] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A 2-layer LLaMA config of hidden size 64 over the byte vocabulary."""
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rope_theta=10000.0)
    settings.update(overrides)
    return LlamaConfig(**settings)


# rope_scaling settings for tiny_llama_config(rope_scaling=...). The dynamic one comes with a
# short max_position_embeddings (24) so that test prompts and generations run past it.
LLAMA_ROPE_SCALING: dict[str, dict[str, Any]] = {
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0},
                    max_position_embeddings=24),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32},
                   rope_theta=500000.0),
    # YaRN as Qwen2.5 / Qwen3 long-context configs give it (a factor over the trained length,
    # which max_position_embeddings states too), and DeepSeek's form (mscale / mscale_all_dim,
    # its own betas, no truncation).
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 24},
                 max_position_embeddings=24),
    "yarn_mscale": dict(rope_scaling={"rope_type": "yarn", "factor": 8.0, "mscale": 1.0,
                                      "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2,
                                      "truncate": False,
                                      "original_max_position_embeddings": 16},
                        max_position_embeddings=128),
}


def tiny_mistral_config(**overrides: Any) -> MistralConfig:
    """A 2-layer Mistral config (GQA, a 4096-token sliding window unless overridden)."""
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rope_theta=10000.0, sliding_window=4096)
    settings.update(overrides)
    return MistralConfig(**settings)


def tiny_qwen2_config(**overrides: Any) -> Qwen2Config:
    """A 2-layer Qwen2 config (GQA, q/k/v biases, tied embeddings as in the small Qwen2s)."""
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rope_theta=1000000.0)
    settings.update(overrides)
    return Qwen2Config(**settings)


MIXTRAL_VARIANTS: dict[str, dict[str, Any]] = {
    "gqa_top2": dict(),
    "mqa_top1_tied": dict(num_key_value_heads=1, num_experts_per_tok=1,
                          tie_word_embeddings=True),
    "window8_top3_of_6": dict(sliding_window=8, num_local_experts=6, num_experts_per_tok=3),
}


def tiny_mixtral_config(**overrides: Any) -> MixtralConfig:
    """A 2-layer Mixtral config: 4 experts of width 96, top-2, GQA, no sliding window."""
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
        tie_word_embeddings=False, sliding_window=None, rope_theta=1000000.0,
        **_BYTE_SPECIAL_IDS)
    settings.update(overrides)
    return MixtralConfig(**settings)


QWEN2_MOE_VARIANTS: dict[str, dict[str, Any]] = {
    "gqa_top2_shared": dict(),
    "norm_topk_tied_mqa": dict(norm_topk_prob=True, tie_word_embeddings=True,
                               num_key_value_heads=1),
    "dense_layer_top1": dict(mlp_only_layers=[0], num_experts_per_tok=1, num_hidden_layers=3,
                             decoder_sparse_step=1),
    "sparse_step2_window": dict(decoder_sparse_step=2, use_sliding_window=True,
                                sliding_window=8, max_window_layers=2, num_hidden_layers=3),
    "gelu_shared_expert": dict(hidden_act="gelu"),
    # The routed experts alone: HF saves a zero-width shared expert and its gate anyway.
    "no_shared_expert": dict(shared_expert_intermediate_size=0),
    "gelu_dense_layer_no_shared": dict(hidden_act="gelu", mlp_only_layers=[0],
                                       shared_expert_intermediate_size=0),
}


def tiny_qwen2_moe_config(**overrides: Any) -> Qwen2MoeConfig:
    """A 2-layer Qwen2-MoE config: 4 routed experts of width 48, top-2 without renormalising,
    a shared expert of width 80, q/k/v biases, GQA, untied embeddings."""
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=48, shared_expert_intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_theta=1000000.0, **_BYTE_SPECIAL_IDS)
    settings.update(overrides)
    return Qwen2MoeConfig(**settings)


# Ids of <unk>, <s> and </s> in the byte vocabulary, for configs whose defaults lie outside it.
_BYTE_SPECIAL_IDS: dict[str, int] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

GPT2_VARIANTS: dict[str, dict[str, Any]] = {
    "h4_l2": dict(n_head=4, n_layer=2),
    "h8_l3": dict(n_head=8, n_layer=3),
    "inv_layer_idx_n_inner": dict(n_head=4, n_layer=3, scale_attn_by_inverse_layer_idx=True,
                                  n_inner=96),
    "untied": dict(n_head=2, n_layer=2, tie_word_embeddings=False),
}


def tiny_gpt2_config(**overrides: Any) -> GPT2Config:
    """A 2-layer GPT-2 config of width 64 and 128 positions over the byte vocabulary."""
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=128,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        **_BYTE_SPECIAL_IDS)
    settings.update(overrides)
    return GPT2Config(**settings)


OPT_VARIANTS: dict[str, dict[str, Any]] = {
    "pre_ln": dict(),
    "post_ln_350m": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
    "project_in_out": dict(word_embed_proj_dim=32),
    "no_bias_untied": dict(enable_bias=False, tie_word_embeddings=False, num_attention_heads=8),
}


def tiny_opt_config(**overrides: Any) -> OPTConfig:
    """A 2-layer pre-LN OPT config of width 64 and 128 positions over the byte vocabulary."""
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, do_layer_norm_before=True,
        activation_function="relu", enable_bias=True, tie_word_embeddings=True,
        **_BYTE_SPECIAL_IDS)
    settings.update(overrides)
    return OPTConfig(**settings)


GPT_NEOX_VARIANTS: dict[str, dict[str, Any]] = {
    "rot25_parallel": dict(rotary_pct=0.25, use_parallel_residual=True),
    "rot100_sequential": dict(rotary_pct=1.0, use_parallel_residual=False),
    "rot50_tied_eps": dict(rotary_pct=0.5, rotary_emb_base=1000.0, tie_word_embeddings=True,
                           layer_norm_eps=1e-6, num_attention_heads=8, hidden_act="gelu_new"),
}


def tiny_gpt_neox_config(**overrides: Any) -> GPTNeoXConfig:
    """A 2-layer GPT-NeoX config (4 heads of 16, rotary on a quarter of each head, parallel
    residual) of width 64 and 128 positions over the byte vocabulary.

    ``rotary_pct`` and ``rotary_emb_base`` are accepted under their transformers 4 names.
    """
    settings: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
        rotary_emb_base=10000.0, use_parallel_residual=True, layer_norm_eps=1e-5,
        hidden_act="gelu", tie_word_embeddings=False, **_BYTE_SPECIAL_IDS)
    settings.update(overrides)
    return GPTNeoXConfig(**settings)


def save_tiny_checkpoint(path: str | Path, config: Any, seed: int = 0,
                         safe_serialization: bool = True, *, train_steps: int = 0,
                         device: str = "cpu") -> Path:
    """Builds a random float32 model for ``config``, saves it and the byte tokenizer to ``path``.

    Weights are drawn with a larger spread than HF's init so that the greedy choices are not
    near-ties (which float32 rounding could flip).

    ``train_steps`` > 0: instead, the model is trained from HF's init for that many steps (on
    ``device``) on a synthetic rule (``_train_on_rule``), which gives it decisive next-token
    logits, margins of several logits as a real checkpoint has. Random weights give nearly flat
    logits: at a few percent of the positions the top two are within bfloat16's rounding, so
    bfloat16 comparisons with HF (top-1 agreement) would measure rounding noise, not the port.
    """
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if train_steps > 0:
        _train_on_rule(model, train_steps, seed, device)
        model.to("cpu")
    else:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                    param.uniform_(0.8, 1.2)  # RMSNorm/LayerNorm gains (GPT-2 names them ln_*)
                else:
                    param.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    byte_tokenizer().save_pretrained(path)
    return path


def _train_on_rule(model: Any, steps: int, seed: int, device: str, lr: float = 3e-3,
                   batch: int = 32, length: int = 96) -> float:
    """Trains ``model`` (AdamW, warm-up then cosine decay) to continue any byte-token sequence
    by the rule: next token = PERM[the token two back] (PERM[first token] after a one-token
    sequence), PERM a random permutation of the 256 byte ids in one cycle, so greedy output
    never settles into a short loop. The rule needs the whole network: attention to the
    previous position through the rotary embeddings, and the MLP/experts for PERM. Each
    training sequence starts with a random-token prefix (the loss skips it), as a test prompt
    does. Returns the last step's loss.
    """
    gen = torch.Generator().manual_seed(seed)
    first = len(SPECIAL_TOKENS)
    order = torch.randperm(BYTE_VOCAB_SIZE - first, generator=gen) + first
    perm = torch.arange(BYTE_VOCAB_SIZE)
    perm[order] = order.roll(-1)
    limit = getattr(model.config, "max_position_embeddings", None) or length
    length = min(length, limit)
    positions = torch.arange(length)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) * (
        0.1 + 0.45 * (1.0 + math.cos(math.pi * step / steps))))
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        ids = torch.randint(first, BYTE_VOCAB_SIZE, (batch, length), generator=gen)
        start = torch.randint(1, length // 2, (batch, 1), generator=gen)
        # A quarter of the sequences follow the rule from their second token (one-token prompts).
        start[torch.rand(batch, generator=gen) < 0.25] = 1
        for t in range(1, length):
            ids[:, t] = torch.where(positions[t] >= start[:, 0], perm[ids[:, max(t - 2, 0)]],
                                    ids[:, t])
        labels = torch.where(positions[None] >= start, ids, torch.full_like(ids, -100))
        loss = model(ids.to(device), labels=labels.to(device)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


# Every public builder, variant table and constant defined here (new ones are exported by
# cacheflow_models.testing without further edits).
__all__ = sorted(name for name, value in list(globals().items())
                 if not name.startswith("_")
                 and (name.isupper() or getattr(value, "__module__", None) == __name__))
