"""The LLaMA family through its config, on CPU in float32: Mistral (sliding window), Qwen2 (q/k/v
biases, per-layer windows) and LLaMA's rope_scaling types give HF transformers' greedy tokens,
with logprobs within 1e-4, on a batch of prompts of different lengths."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheflow_models import build_model_config
from cacheflow_models.testing import (
    LLAMA_ROPE_SCALING,
    check_greedy_fidelity,
    save_tiny_checkpoint,
    tiny_llama_config,
    tiny_mistral_config,
    tiny_qwen2_config,
)

NEW_TOKENS = 32


@pytest.mark.parametrize("kind", sorted(LLAMA_ROPE_SCALING))
def test_rope_scaling_matches_hf(kind: str, tmp_path: Path,
                                 prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / kind, tiny_llama_config(**LLAMA_ROPE_SCALING[kind]))
    if kind == "dynamic":
        # Every prompt runs past the 24 trained positions: the 40-token one at prefill, the
        # others during generation.
        assert build_model_config(path).max_model_len == 24 * 4
        assert all(len(p) + NEW_TOKENS > 24 for p in prompt_batch)
        assert max(len(p) for p in prompt_batch) > 24
    if kind.startswith("yarn"):  # served to factor x the original length, as vLLM does
        scaling = LLAMA_ROPE_SCALING[kind]["rope_scaling"]
        original = scaling["original_max_position_embeddings"]
        assert build_model_config(path).max_model_len == int(original * scaling["factor"])
        assert max(len(p) for p in prompt_batch) > original
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


def test_mistral_matches_hf(tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / "mistral", tiny_mistral_config())
    assert build_model_config(path).architecture == "MistralForCausalLM"
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


def test_mistral_sliding_window_matches_hf(tmp_path: Path,
                                           prompt_batch: list[list[int]]) -> None:
    # A window of 8 tokens, much shorter than the prompts plus generations.
    path = save_tiny_checkpoint(tmp_path / "window", tiny_mistral_config(sliding_window=8))
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


def test_qwen2_matches_hf(tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / "qwen2", tiny_qwen2_config())
    assert build_model_config(path).architecture == "Qwen2ForCausalLM"
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


def test_qwen2_per_layer_sliding_window_matches_hf(tmp_path: Path,
                                                   prompt_batch: list[list[int]]) -> None:
    # Layer 0 attends to everything, layer 1 to the last 8 tokens (Qwen2's max_window_layers).
    config = tiny_qwen2_config(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                               tie_word_embeddings=False)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    path = save_tiny_checkpoint(tmp_path / "qwen2w", config)
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


def test_mistral_mqa_with_own_head_dim_matches_hf(tmp_path: Path,
                                                  prompt_batch: list[list[int]]) -> None:
    # A third Mistral shape: one KV head, head_dim larger than hidden/heads, tied embeddings.
    config = tiny_mistral_config(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                 tie_word_embeddings=True, sliding_window=None)
    path = save_tiny_checkpoint(tmp_path / "mistral_mqa", config)
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)


def test_qwen2_mha_untied_matches_hf(tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    # A third Qwen2 shape: as many KV heads as query heads, untied head, three layers.
    config = tiny_qwen2_config(num_attention_heads=4, num_key_value_heads=4,
                               num_hidden_layers=3, tie_word_embeddings=False)
    path = save_tiny_checkpoint(tmp_path / "qwen2_mha", config)
    check_greedy_fidelity(path, prompt_batch, NEW_TOKENS)
