"""The engine on a CUDA device: float32 greedy identical to HF transformers on the same card;
bf16 reported as top-1 agreement and first divergence (run with ``pytest -m gpu``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_models.testing import save_tiny_checkpoint, tiny_llama_config
from cacheflow_runtime import SamplingParams

from models_testutil import hf_greedy, run_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gpu"), tiny_llama_config())


def test_float32_greedy_matches_hf_on_cuda(tiny: Path, prompt_batch: list[list[int]]) -> None:
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = run_engine(tiny, prompt_batch, params, dtype="float32", device="cuda")
    for prompt, out in zip(prompt_batch, outputs):
        ref, _ = hf_greedy(tiny, prompt, 32, torch.float32, "cuda")
        assert out.outputs[0].token_ids == ref


def test_bfloat16_agreement_on_cuda(tiny: Path, prompt_batch: list[list[int]]) -> None:
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = run_engine(tiny, prompt_batch, params, dtype="bfloat16", device="cuda")
    agree = total = 0
    for prompt, out in zip(prompt_batch, outputs):
        ref, _ = hf_greedy(tiny, prompt, 32, torch.bfloat16, "cuda")
        ours = out.outputs[0].token_ids
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        print(f"prompt of {len(prompt)} tokens: first divergence at {first}")
        # Top-1 agreement up to the first divergence (after it the contexts differ).
        agree += len(ref) if first is None else first
        total += len(ref)
    print(f"bf16 greedy agreement before divergence: {agree}/{total}")
    assert agree / total >= 0.5


def test_cache_sized_from_free_memory_on_cuda(tiny: Path, prompt_batch: list[list[int]]) -> None:
    """No kv_cache_blocks given: the engine profiles a peak-sized step (prompts of at most
    max_model_len tokens) and fills gpu_memory_utilization of the card with KV blocks."""
    from cacheflow_models import build_model_config, load_tokenizer
    from cacheflow_runtime import CacheConfig, LLMEngine, SchedulerConfig
    from cacheflow_runtime.model_executor.cache_engine import block_bytes

    model_config = build_model_config(tiny, "float32", None, "cuda")
    cache_config = CacheConfig(gpu_memory_utilization=0.5)
    engine = LLMEngine(model_config, cache_config,
                       SchedulerConfig(max_model_len=model_config.max_model_len),
                       load_tokenizer(tiny), "cuda")
    blocks = engine.worker.cache_engine.num_device_blocks
    total = torch.cuda.get_device_properties(0).total_memory
    cache_bytes = blocks * block_bytes(model_config, cache_config.block_size)
    assert 0.3 * total < cache_bytes < 0.5 * total
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("0", None, params, prompt_batch[0])
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    ref, _ = hf_greedy(tiny, prompt_batch[0], 8, torch.float32, "cuda")
    assert outputs[0].outputs[0].token_ids == ref
