"""Tiny random checkpoints for tests: an HF model saved with save_pretrained plus a byte tokenizer.

Nothing is downloaded: the config is built here, the weights are random, and the tokenizer
maps each byte to one token (ids 0-2 are the special tokens <unk>, <s>, </s>).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

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


def save_tiny_checkpoint(path: str | Path, config: Any, seed: int = 0,
                         safe_serialization: bool = True) -> Path:
    """Builds a random float32 model for ``config``, saves it and the byte tokenizer to ``path``.

    Weights are drawn with a larger spread than HF's init so that the greedy choices are not
    near-ties (which float32 rounding could flip).
    """
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    byte_tokenizer().save_pretrained(path)
    return path
