"""Tensor parallelism on CPU: two worker processes over gloo give the greedy tokens of a single
process for every registered architecture (float32 tiny checkpoints over the 259-token byte
vocabulary, which does not split evenly over 2 ranks; LLaMA with one KV head for two ranks
replicates it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cacheflow_models import build_model_config
from cacheflow_models.testing import (
    BYTE_VOCAB_SIZE,
    run_engine,
    save_tiny_checkpoint,
    tiny_gpt2_config,
    tiny_gpt_neox_config,
    tiny_llama_config,
    tiny_mistral_config,
    tiny_mixtral_config,
    tiny_opt_config,
    tiny_qwen2_config,
    tiny_qwen2_moe_config,
)
from cacheflow_runtime import SamplingParams
from cacheflow_runtime.registry import supported_architectures

from dense_testutil import (
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_phi3_config,
    tiny_qwen3_config,
)

CONFIGS: dict[str, Callable[[], Any]] = {
    "LlamaForCausalLM": lambda: tiny_llama_config(num_attention_heads=4, num_key_value_heads=1),
    "MistralForCausalLM": tiny_mistral_config,
    "Qwen2ForCausalLM": tiny_qwen2_config,
    "GPT2LMHeadModel": tiny_gpt2_config,
    "OPTForCausalLM": tiny_opt_config,
    "GPTNeoXForCausalLM": tiny_gpt_neox_config,
    "Qwen3ForCausalLM": tiny_qwen3_config,
    "Gemma2ForCausalLM": tiny_gemma2_config,
    "Gemma3ForCausalLM": tiny_gemma3_config,
    "Phi3ForCausalLM": tiny_phi3_config,
    "MixtralForCausalLM": tiny_mixtral_config,
    "Qwen2MoeForCausalLM": tiny_qwen2_moe_config,
}
NEW_TOKENS = 12


def test_every_registered_architecture_is_covered() -> None:
    assert set(CONFIGS) >= set(supported_architectures())
    assert BYTE_VOCAB_SIZE % 2 == 1


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_tp2_greedy_matches_tp1(architecture: str, tmp_path: Path,
                                prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / architecture, CONFIGS[architecture]())
    assert build_model_config(path, "float32").architecture == architecture
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    single = run_engine(path, prompt_batch, params)
    split = run_engine(path, prompt_batch, params, tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in split] == [o.outputs[0].token_ids for o in single]
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in split)
