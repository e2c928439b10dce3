"""Acceptance: with a KV cache far too small for 16 requests at once, every request finishes in
both preemption modes with outputs identical to an unconstrained run, and no block leaks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM

from serve_testutil import assert_idle, completions

ONE_TORCH_THREAD = True  # see conftest.py
BLOCK_SIZE = 8
MAX_TOKENS = 16
# 16 prompts of 1 to 40 tokens, crossing block boundaries; the longest request (40 + 16 tokens)
# needs 7 blocks, all 16 together 77.
PROMPT_LENS = [3, 40, 9, 17, 25, 1, 33, 12, 8, 16, 30, 5, 21, 38, 14, 27]
# Room for about three requests at full length.
KV_BLOCKS = 16
# Room for about two requests of three sequences at full length.
KV_BLOCKS_GROUPS = 24
SWAP_GIB = 0.01  # 2621 CPU blocks of 4 KiB for this model: plenty


def _blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


def preemption_prompts() -> list[dict[str, list[int]]]:
    """The 16 prompts of PROMPT_LENS tokens (seeded)."""
    gen = torch.Generator().manual_seed(2024)
    return [{"prompt_token_ids": torch.randint(3, 259, (n,), generator=gen).tolist()}
            for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def prompts() -> list[dict[str, list[int]]]:
    return preemption_prompts()


def _greedy() -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            for _ in PROMPT_LENS]


def _seeded() -> list[SamplingParams]:
    return [SamplingParams(temperature=0.8, seed=1000 + i, max_tokens=MAX_TOKENS, ignore_eos=True)
            for i in range(len(PROMPT_LENS))]


def _parallel() -> list[SamplingParams]:
    return [SamplingParams(n=2, best_of=3, temperature=0.8, seed=2000 + i, max_tokens=12,
                           ignore_eos=True, logprobs=0)
            for i in range(len(PROMPT_LENS))]


PARAMS: dict[str, Callable[[], list[SamplingParams]]] = {
    "greedy": _greedy, "seeded": _seeded, "parallel": _parallel}


def make_poisoned_llm(tiny_path: Path, device: str = "cpu", **kwargs: Any) -> LLM:
    """An LLM whose KV cache (device and swap space) is poisoned with NaN: a read of a slot
    that no step wrote (a lost swap, a missed copy-on-write) turns the output into NaN."""
    llm = LLM(tiny_path, device=device, dtype="float32", block_size=BLOCK_SIZE,
              swap_space=SWAP_GIB, **kwargs)
    cache = llm.engine.executor.worker.cache_engine
    for key_cache, value_cache in cache.device_cache + cache.cpu_cache:
        key_cache.fill_(float("nan"))
        value_cache.fill_(float("nan"))
    return llm


@pytest.fixture(scope="module")
def reference(tiny_path: Path, prompts: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Outputs of every parameter set with a cache that holds all requests at once."""
    llm = make_poisoned_llm(tiny_path, kv_cache_blocks=1024)
    outputs = {name: llm.generate(prompts, make(), use_tqdm=False)
               for name, make in PARAMS.items()}
    assert llm.engine.scheduler.num_preemptions == 0
    assert_idle(llm)
    return outputs


def count_swap_outs(llm: LLM) -> list[str]:
    """Records the request id of every group the block manager swaps out."""
    bm = llm.engine.block_manager
    calls: list[str] = []
    original = bm.swap_out

    def swap_out(group: Any) -> dict[int, int]:
        calls.append(group.request_id)
        return original(group)

    bm.swap_out = swap_out  # type: ignore[method-assign]
    return calls


def assert_same_outputs(got: list[Any], want: list[Any]) -> None:
    assert completions(got) == completions(want)
    for g, w in zip(got, want):
        assert g.prompt_token_ids == w.prompt_token_ids
        for gc, wc in zip(g.outputs, w.outputs):
            assert gc.cumulative_logprob == pytest.approx(wc.cumulative_logprob, abs=1e-4)


def test_the_cache_is_really_too_small(prompts: list[dict[str, list[int]]]) -> None:
    need = [_blocks(len(p["prompt_token_ids"]) + MAX_TOKENS) for p in prompts]
    assert max(need) <= KV_BLOCKS < sum(need) / 4
    assert sum(_blocks(len(p["prompt_token_ids"])) for p in prompts) > 2 * KV_BLOCKS


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_single_sequence_requests_survive_preemption(
        mode: str, kind: str, tiny_path: Path, prompts: list[dict[str, list[int]]],
        reference: dict[str, Any]) -> None:
    llm = make_poisoned_llm(tiny_path, kv_cache_blocks=KV_BLOCKS, preemption_mode=mode)
    swapped = count_swap_outs(llm)
    outputs = llm.generate(prompts, PARAMS[kind](), use_tqdm=False)

    assert [len(o.outputs) for o in outputs] == [1] * len(PROMPT_LENS)
    assert all(o.finished for o in outputs)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [MAX_TOKENS] * len(PROMPT_LENS)
    assert_same_outputs(outputs, reference[kind])
    num_preemptions = llm.engine.scheduler.num_preemptions
    assert num_preemptions > 0
    if mode == "swap":
        assert len(swapped) == num_preemptions
    else:
        assert swapped == []  # single-sequence requests are recomputed, never swapped
    assert_idle(llm)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_parallel_sampling_groups_are_swapped_and_match(
        mode: str, tiny_path: Path, prompts: list[dict[str, list[int]]],
        reference: dict[str, Any]) -> None:
    # Groups of several sequences share blocks, so they are swapped even in recompute mode.
    llm = make_poisoned_llm(tiny_path, kv_cache_blocks=KV_BLOCKS_GROUPS, preemption_mode=mode)
    swapped = count_swap_outs(llm)
    outputs = llm.generate(prompts, _parallel(), use_tqdm=False)

    assert [len(o.outputs) for o in outputs] == [2] * len(PROMPT_LENS)
    for out in outputs:
        first, second = out.outputs
        assert first.cumulative_logprob >= second.cumulative_logprob
        assert first.cumulative_logprob == pytest.approx(sum(
            lp[t] for lp, t in zip(first.logprobs, first.token_ids)), abs=1e-4)
    assert_same_outputs(outputs, reference["parallel"])
    assert len(swapped) == llm.engine.scheduler.num_preemptions > 0
    assert_idle(llm)


def test_later_batches_after_preemption_are_unaffected(
        tiny_path: Path, prompts: list[dict[str, list[int]]], reference: dict[str, Any]) -> None:
    """The same LLM runs the pressured batch twice (greedy, then seeded) with no state left."""
    llm = make_poisoned_llm(tiny_path, kv_cache_blocks=KV_BLOCKS, preemption_mode="swap")
    for kind in ("greedy", "seeded", "greedy"):
        assert_same_outputs(llm.generate(prompts, PARAMS[kind](), use_tqdm=False), reference[kind])
        assert_idle(llm)


def _run_alone(llm: LLM, request_id: str, prompt: list[int], params: SamplingParams,
               max_steps: int) -> Any:
    """Adds one request and steps the engine; returns its final output, or None if it is still
    unfinished after ``max_steps`` steps (a hang)."""
    llm.engine.add_request(request_id, None, params, prompt)
    for _ in range(max_steps):
        for out in llm.engine.step():
            if out.finished:
                return out
    return None


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("best_of", [1, 3])
def test_an_accepted_request_always_finishes(mode: str, best_of: int, tiny_path: Path) -> None:
    """Near the cache's capacity a request is either rejected by add_request or finishes.

    A decode step wants a free block per running sequence, and a swap-in wants the group's blocks
    plus one per sequence, so a request whose tokens just fit can still be stuck forever once it
    is swapped out; it must be refused up front instead.
    """
    kv_blocks = 4 if best_of == 1 else 6
    llm = make_poisoned_llm(tiny_path, kv_cache_blocks=kv_blocks, preemption_mode=mode)
    unconstrained = make_poisoned_llm(tiny_path, kv_cache_blocks=256)
    accepted, rejected = [], []
    for max_tokens in range(2, kv_blocks * BLOCK_SIZE, 3):
        prompt = list(range(3, 4 + max_tokens % 5))
        longest = len(prompt) + max_tokens
        params = SamplingParams(n=best_of, temperature=0.8, seed=max_tokens,
                                max_tokens=max_tokens, ignore_eos=True)
        try:
            out = _run_alone(llm, f"r{max_tokens}", prompt, params, 4 * max_tokens + 10)
        except ValueError as exc:
            assert "KV-cache blocks" in str(exc)
            assert_idle(llm)
            rejected.append(longest)
            continue
        assert out is not None, f"{longest} tokens: accepted but never finished"
        want = _run_alone(unconstrained, f"r{max_tokens}", prompt, params, 4 * max_tokens + 10)
        assert completions([out]) == completions([want])
        assert_idle(llm)
        accepted.append(longest)
    assert accepted and rejected
    if best_of == 1 and mode == "recompute":
        # A recomputed sequence needs no more than the blocks of its own tokens.
        assert all(_blocks(n) > kv_blocks for n in rejected)
    # Whatever fits with every sequence in private blocks plus one spare each is accepted.
    assert all(best_of * (_blocks(n) + 1) > kv_blocks for n in rejected)
