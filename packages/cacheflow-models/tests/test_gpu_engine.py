"""The engine on a CUDA device: float32 greedy identical to HF transformers on the same card;
bf16 reported as top-1 agreement and first divergence (run with ``pytest -m gpu``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheflow_models.testing import (
    LLAMA_ROPE_SCALING,
    hf_greedy,
    run_engine,
    save_tiny_checkpoint,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_mistral_config,
)
from cacheflow_runtime import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


# Head size 64, which the decode kernel is built for (the CPU tests' tiny models have 16, which
# runs the reference attention backend and no CUDA graphs).
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gpu"), tiny_llama_config(**WIDE))


def test_float32_greedy_matches_hf_on_cuda(tiny: Path, prompt_batch: list[list[int]]) -> None:
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = run_engine(tiny, prompt_batch, params, dtype="float32", device="cuda")
    for prompt, out in zip(prompt_batch, outputs):
        ref, _ = hf_greedy(tiny, prompt, 32, torch.float32, "cuda")
        assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize("kind", ["yarn", "yarn_mscale", "llama3"])
def test_scaled_rope_matches_hf_on_cuda(kind: str, tmp_path: Path,
                                        prompt_batch: list[list[int]]) -> None:
    """Position-only rope scaling (its table scaled by YaRN's attention factor) through the
    CUDA rotary kernels, fused or not, and decode graphs: HF's float32 greedy tokens."""
    path = save_tiny_checkpoint(tmp_path / kind,
                                tiny_llama_config(**{**LLAMA_ROPE_SCALING[kind], **WIDE}))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = run_engine(path, prompt_batch, params, dtype="float32", device="cuda")
    for prompt, out in zip(prompt_batch, outputs):
        ref, _ = hf_greedy(path, prompt, 32, torch.float32, "cuda")
        assert out.outputs[0].token_ids == ref


def test_float32_greedy_matches_hf_with_reference_attention_on_cuda(
        tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    """Head size 16 has no decode kernel: the reference attention backend on CUDA, eager steps."""
    path = save_tiny_checkpoint(tmp_path / "narrow", tiny_llama_config())
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engines: list = []
    outputs = run_engine(path, prompt_batch, params, dtype="float32", device="cuda",
                         engine_out=engines)
    assert not engines[0].uses_cuda_graphs
    for prompt, out in zip(prompt_batch, outputs):
        ref, _ = hf_greedy(path, prompt, 16, torch.float32, "cuda")
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
    blocks = engine.executor.worker.cache_engine.num_device_blocks
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


GRAPH_CONFIGS = {
    "llama": lambda: tiny_llama_config(**WIDE),
    "mistral_window_16": lambda: tiny_mistral_config(sliding_window=16, **WIDE),
    "gpt2": lambda: tiny_gpt2_config(n_embd=256, n_head=4),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(GRAPH_CONFIGS))
def test_cuda_graphs_match_eager(name: str, dtype: str, prompt_batch: list[list[int]],
                                 tmp_path: Path) -> None:
    """Decode steps replayed from CUDA graphs (a batch of 5 padded into the graph of 8, then
    smaller graphs as requests finish) give the tokens and logprobs of eager steps."""
    path = save_tiny_checkpoint(tmp_path / name, GRAPH_CONFIGS[name]())
    params = [SamplingParams(temperature=0, max_tokens=8 + 6 * i, ignore_eos=True, logprobs=2)
              for i in range(len(prompt_batch))]
    engines: list = []
    graphed = run_engine(path, prompt_batch, params, dtype=dtype, device="cuda",
                         engine_out=engines)
    eager = run_engine(path, prompt_batch, params, dtype=dtype, device="cuda",
                       enforce_eager=True)
    engine = engines[0]
    assert engine.uses_cuda_graphs
    assert 8 in engine.executor.worker.runner.decode_graphs.sizes
    for got, want in zip(graphed, eager):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].cumulative_logprob == pytest.approx(
            want.outputs[0].cumulative_logprob, abs=1e-4 if dtype == "float32" else 1e-2)


def test_cuda_graph_replays_are_used(tiny: Path, prompt_batch: list[list[int]],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cacheflow_runtime.model_executor import cuda_graphs

    replays: list[int] = []
    original = torch.cuda.CUDAGraph.replay

    def counted(self: torch.cuda.CUDAGraph) -> None:
        replays.append(1)
        original(self)

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    engines: list = []
    with monkeypatch.context() as m:
        m.setattr(torch.cuda.CUDAGraph, "replay", counted)
        run_engine(tiny, prompt_batch, params, device="cuda", engine_out=engines)
    # one prefill step (eager), then 9 decode steps from graphs
    assert len(replays) == 9
    assert cuda_graphs.graph_batch_size(len(prompt_batch), engines[0].executor.worker.runner
                                        .decode_graphs.sizes) == 8
    usage = engines[0].executor.cuda_graph_usage()
    n = len(prompt_batch)
    assert usage["graph_steps"] == 9 and usage["graph_rows"] == 9 * n
    assert usage["padding_rows"] == 9 * (8 - n)
    assert usage["padding_fraction"] == pytest.approx((8 - n) / 8)
    assert usage["eager_decode_steps"] == 0


def test_dynamic_rope_models_run_eagerly(tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    path = save_tiny_checkpoint(tmp_path / "dyn", tiny_llama_config(
        rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **WIDE))
    engines: list = []
    outputs = run_engine(path, prompt_batch[:2], SamplingParams(temperature=0, max_tokens=4,
                                                                ignore_eos=True),
                         device="cuda", engine_out=engines)
    assert not engines[0].uses_cuda_graphs
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch.cuda.get_device_capability() >= (9, 0)),
                    reason="skinny_gemm runs on compute capability 9.0+")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stream_fusion_on_hopper(tiny: Path, prompt_batch: list[list[int]], dtype: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One-row decode steps run the norms and residual adds inside skinny_gemm (the default;
    CACHEFLOW_SKINNY_FUSE=0 for the plain engine; CUDA graphs included). The kernel sums the
    norm's squares in another order, so a normalized element can move by one rounding step: the
    greedy tokens must agree with the plain engine's up to a late divergence, with logprobs close
    until then."""
    import cacheflow_kernels

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0)
    prompts = [prompt_batch[2]]  # one sequence: one-row decode steps
    monkeypatch.setenv("CACHEFLOW_SKINNY_FUSE", "0")
    plain = run_engine(tiny, prompts, params, dtype=dtype, device="cuda")[0].outputs[0]
    fused_calls: list[bool] = []
    original = cacheflow_kernels.skinny_gemm

    def recorded(*args: object, **kwargs: object) -> None:
        fused_calls.append(kwargs.get("norm_weight") is not None
                           or kwargs.get("residual") is not None)
        original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cacheflow_kernels, "skinny_gemm", recorded)
    monkeypatch.delenv("CACHEFLOW_SKINNY_FUSE", raising=False)
    fused = run_engine(tiny, prompts, params, dtype=dtype, device="cuda")[0].outputs[0]
    assert any(fused_calls)
    first = next((i for i, (a, b) in enumerate(zip(plain.token_ids, fused.token_ids))
                  if a != b), None)
    print(f"{dtype}: first divergence at {first}")
    assert first is None or first >= 24
    for i in range(len(plain.token_ids) if first is None else first):
        t = plain.token_ids[i]
        assert abs(plain.logprobs[i][t] - fused.logprobs[i][t]) < 0.05, i


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rotary_fused_into_decode_attention(tiny: Path, prompt_batch: list[list[int]],
                                            dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CACHEFLOW_ATTN_ROTARY_FUSE=1: decode steps (CUDA graphs included) rotate and store the new
    token inside the decode attention kernel. The kernel does the rotary kernel's arithmetic, so
    greedy tokens and their logprobs are those of the engine with the two kernels (=0) exactly."""
    import cacheflow_kernels

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    monkeypatch.setenv("CACHEFLOW_ATTN_ROTARY_FUSE", "0")
    plain = run_engine(tiny, prompt_batch, params, dtype=dtype, device="cuda")
    ran: list[bool] = []
    original = cacheflow_kernels.paged_attention_with_rotary_cache

    def recorded(*args: object, **kwargs: object) -> bool:
        ran.append(original(*args, **kwargs))  # type: ignore[arg-type]
        return ran[-1]

    monkeypatch.setattr(cacheflow_kernels, "paged_attention_with_rotary_cache", recorded)
    monkeypatch.setenv("CACHEFLOW_ATTN_ROTARY_FUSE", "1")
    fused = run_engine(tiny, prompt_batch, params, dtype=dtype, device="cuda")
    assert ran and all(ran)
    for a, b in zip(plain, fused):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
