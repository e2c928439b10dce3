"""Mixture-of-experts models on a CUDA device: float32 greedy identical to HF transformers on
the same card (the sync-free torch expert path, CUDA graphs of decode steps), and bfloat16 top-1
agreement with HF (the grouped expert kernel): HF, run on our generated sequence, picks our
token at every position. Run with ``pytest -m gpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cacheflow_models.testing import (
    hf_greedy,
    prompt_batch,
    run_engine,
    save_tiny_checkpoint,
    tiny_mixtral_config,
    tiny_qwen2_moe_config,
)
from cacheflow_runtime import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Head size 64 (the decode kernel's), expert widths that are multiples of 8 (the grouped kernel).
WIDE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
BUILDERS = {
    "mixtral": lambda: tiny_mixtral_config(intermediate_size=344, num_local_experts=8, **WIDE),
    "qwen2_moe": lambda: tiny_qwen2_moe_config(moe_intermediate_size=160,
                                               shared_expert_intermediate_size=320,
                                               num_experts=8, **WIDE),
}
NEW_TOKENS = 32


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_float32_greedy_matches_hf_on_cuda(name: str, tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / name, BUILDERS[name]())
    prompts = prompt_batch()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = run_engine(path, prompts, params, dtype="float32", device="cuda")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda")
    for prompt, out in zip(prompts, outputs):
        ref, _ = hf_greedy(path, prompt, NEW_TOKENS, model=hf, device="cuda")
        assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bfloat16_top1_agreement_on_cuda(name: str, tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / name, BUILDERS[name]())
    prompts = prompt_batch()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = run_engine(path, prompts, params, dtype="bfloat16", device="cuda")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    agree = total = 0
    for prompt, out in zip(prompts, outputs):
        ours = out.outputs[0].token_ids
        ids = torch.tensor([prompt + ours], device="cuda")
        with torch.no_grad():
            logits = hf(ids).logits[0, len(prompt) - 1:-1]
        agree += sum(int(a == b) for a, b in zip(logits.argmax(-1).tolist(), ours))
        total += len(ours)
    print(f"{name}: bf16 top-1 agreement with HF {agree}/{total} = {agree / total:.4f}")
    assert agree / total >= 0.99
