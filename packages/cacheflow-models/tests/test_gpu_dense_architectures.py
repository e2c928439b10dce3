"""Qwen3, Gemma 2, Gemma 3 and Phi-3 on a CUDA device in bfloat16 (run with ``pytest -m gpu``).

Top-1 agreement with HF transformers: our engine generates greedily (decode kernels, CUDA graphs
where the model allows them), then HF runs one forward pass over the prompt and our tokens in
bfloat16; at every generated position HF's top-1 token must be ours in at least 99% of the
positions. Comparing on the same context measures each step rather than counting every token
after a first divergence as a miss. Shapes are the kernels': head size 64 (128 for Qwen3, 256
for Gemma, Gemma 2 soft-capping attention on the reference backend).

The agreement test's checkpoints are trained briefly (``save_tiny_checkpoint(...,
train_steps=TRAIN_STEPS)``), not random. A random model's next-token logits are nearly flat: at
a few percent of the positions its top two logits are within bfloat16's rounding of each other
(HF in bfloat16 against HF in float32 on CPU: 94-99% top-1 agreement; 5-11% of the positions
have top-1/top-2 margins under 0.05 logit), so two correct bfloat16 implementations disagree
there and the 99% bar would measure rounding noise, not the port; Gemma's random models even
repeat one token, which agrees trivially. Trained to continue any sequence by a rule that needs
attention to the previous position (next token = a fixed permutation of the token two back), the
models have the decisive logits of a real checkpoint, margins of several logits, and varied
output: at least MIN_DISTINCT distinct tokens per prompt, asserted, so the test cannot pass on
degenerate output. On a miss it prints HF's float32 top-1/top-2 margin there (a near-tie shows
as a margin of hundredths of a logit). The graph-versus-eager test compares float32 runs of the
random checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cacheflow_models.testing import run_engine, save_tiny_checkpoint, top1_agreement
from cacheflow_runtime import SamplingParams

from dense_testutil import (
    PHI3_LONGROPE,
    longrope_scaling,
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_phi3_config,
    tiny_qwen3_config,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NEW_TOKENS = 48
MIN_DISTINCT = NEW_TOKENS // 4  # distinct tokens each prompt's greedy output must have
TRAIN_STEPS = 1000  # save_tiny_checkpoint's training of the agreement test's checkpoints
WIDE: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                            num_key_value_heads=2)
GEMMA: dict[str, Any] = dict(WIDE, head_dim=256, query_pre_attn_scalar=256, sliding_window=16)

CONFIGS = {
    "qwen3": lambda: tiny_qwen3_config(**dict(WIDE, head_dim=128)),
    "gemma2": lambda: tiny_gemma2_config(**dict(GEMMA, attn_logit_softcapping=50.0,
                                                final_logit_softcapping=30.0)),
    "gemma3": lambda: tiny_gemma3_config(**GEMMA),
    "phi3_longrope_partial": lambda: tiny_phi3_config(**dict(
        WIDE, **PHI3_LONGROPE, partial_rotary_factor=0.75,
        rope_scaling=longrope_scaling(48))),
}


def prompts_for(name: str, prompt_batch: list[list[int]]) -> list[list[int]]:
    """The test prompts; for longrope, prompts past the original length from their prefill
    (HF's single forward pass rotates every position of a sequence longer than the original
    length with the long factors, which the engine gives only to sequences long at prefill)."""
    if not name.startswith("phi3_longrope"):
        return prompt_batch
    b = prompt_batch
    prompts = [b[4], b[2] + b[3], b[1] + b[3] + b[0], b[4][:30], b[3] + b[1] + b[1]]
    original = PHI3_LONGROPE["original_max_position_embeddings"]
    assert all(len(p) > original for p in prompts)
    assert max(len(p) for p in prompts) + NEW_TOKENS <= PHI3_LONGROPE["max_position_embeddings"]
    return prompts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_top1_agreement_with_hf(name: str, tmp_path: Path,
                                         prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / name, CONFIGS[name](), train_steps=TRAIN_STEPS,
                                device="cuda")
    prompts = prompts_for(name, prompt_batch)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = run_engine(path, prompts, params, dtype="bfloat16", device="cuda")
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outputs)
    distinct = [len(set(o.outputs[0].token_ids)) for o in outputs]
    assert min(distinct) >= MIN_DISTINCT, f"degenerate greedy output: {distinct} distinct tokens"
    assert top1_agreement(path, prompts, outputs) >= 0.99


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_graphs_match_eager(name: str, tmp_path: Path,
                                 prompt_batch: list[list[int]]) -> None:
    """Graph-captured decode steps (the kernels take Gemma 2's soft cap) give the eager steps'
    tokens."""
    path = save_tiny_checkpoint(tmp_path / name, CONFIGS[name]())
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engines: list = []
    graphed = run_engine(path, prompt_batch, params, dtype="float32", device="cuda",
                         engine_out=engines)
    eager = run_engine(path, prompt_batch, params, dtype="float32", device="cuda",
                       enforce_eager=True)
    assert engines[0].uses_cuda_graphs
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]
