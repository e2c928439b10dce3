"""LLaMA on CPU in float32: greedy tokens identical to HF transformers, logprobs within 1e-4."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheflow_models.testing import (
    LLAMA_VARIANTS,
    assert_tp_shards_roundtrip,
    hf_greedy,
    run_engine,
    save_tiny_checkpoint,
    tiny_llama_config,
    tiny_mistral_config,
    tiny_qwen2_config,
)
from cacheflow_runtime import SamplingParams

NEW_TOKENS = 32


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_greedy_matches_hf(variant: str, tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / variant, tiny_llama_config(**LLAMA_VARIANTS[variant]))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = run_engine(path, prompt_batch, params)
    for prompt, out in zip(prompt_batch, outputs):
        ref_tokens, ref_logprobs = hf_greedy(path, prompt, NEW_TOKENS)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        assert completion.finish_reason == "length"
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-4


def test_unequal_head_dim_and_bias(tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    config = tiny_llama_config(head_dim=32, attention_bias=True, mlp_bias=True)
    path = save_tiny_checkpoint(tmp_path / "hd", config)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = run_engine(path, prompt_batch[:3], params)
    for prompt, out in zip(prompt_batch[:3], outputs):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 16)[0]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_tensor_parallel_shards_concatenate_to_the_full_tensors(
        variant: str, world_size: int, tmp_path: Path) -> None:
    # gqa at world 4 and mqa at 2 and 4 replicate KV heads over ranks.
    path = save_tiny_checkpoint(tmp_path / variant, tiny_llama_config(**LLAMA_VARIANTS[variant]))
    assert assert_tp_shards_roundtrip(path, world_size) > 0


@pytest.mark.parametrize("builder", [tiny_mistral_config, tiny_qwen2_config])
def test_mistral_and_qwen2_shards_concatenate(builder: object, tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "tp", builder())  # type: ignore[operator]
    assert assert_tp_shards_roundtrip(path, 2) > 0
