"""The up-front check that a request fits in the KV cache: a request that just fits is
accepted and runs to the end alone, one token more is refused, for single sequences, parallel
sampling and beam search, with the scheduler ahead of the device or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_testutil import make_engine, run_all

from cacheflow_runtime import LLMEngine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name -> (sampling keywords, preemption mode, block size, cache blocks, prompt length, the
# largest max_tokens that fits, the blocks one more token needs). The K/V of at most
# prompt + max_tokens - 1 tokens is written per sequence: the last sampled token is never fed
# back. Swapped groups (swap mode, or several sequences) must also fit when swapped out just
# before their last decode step, plus the free block per sequence a swap-in wants:
# full prompt blocks + sequences * (own blocks of prompt + max_tokens - 2 tokens) + sequences.
CASES: dict[str, tuple[dict[str, Any], str, int, int, int, int, int]] = {
    # 11 + 6 - 1 = 16 tokens: one block of 16 (the cache); 17 tokens need two.
    "one_block": (dict(temperature=0.0), "recompute", 16, 1, 11, 6, 2),
    # 5 + 12 - 1 = 16 tokens: two blocks of 8.
    "greedy": (dict(temperature=0.0), "recompute", 8, 2, 5, 12, 3),
    # Swapped out with 5 + 5 - 2 = 8 tokens (1 block), plus 1 to swap in; 6 more: 2 + 1.
    "swap": (dict(temperature=0.0), "swap", 8, 2, 5, 5, 3),
    # 1 + 3 * (blocks(10 + 8 - 2) - 1) + 3 = 8; max_tokens 9: 1 + 3 * 2 + 3 = 10.
    "n3": (dict(n=3, temperature=0.8, seed=1), "recompute", 8, 8, 10, 8, 10),
    "best_of": (dict(n=2, best_of=3, temperature=0.8, seed=2), "swap", 8, 8, 10, 8, 10),
    "beam": (dict(n=2, best_of=3, use_beam_search=True, temperature=0.0), "recompute", 8, 8,
             10, 8, 10),
}


def _engine(tiny: Path, name: str, async_scheduling: bool) -> LLMEngine:
    _, mode, block_size, blocks, *_ = CASES[name]
    return make_engine(tiny, blocks=blocks, block_size=block_size, preemption_mode=mode,
                       async_scheduling=async_scheduling)


def _params(name: str, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **CASES[name][0])


def _record_peak_blocks(engine: LLMEngine) -> list[int]:
    """A list that holds the most device blocks in use at once from now on (it starts at 0)."""
    allocator = engine.block_manager._gpu_allocator
    allocate = allocator.allocate
    peak = [0]

    def recording_allocate() -> Any:
        block = allocate()
        peak[0] = max(peak[0], allocator.num_blocks - allocator.get_num_free_blocks())
        return block
    allocator.allocate = recording_allocate  # type: ignore[method-assign]
    return peak


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_request_that_just_fits_is_accepted_and_finishes(tiny: Path, name: str,
                                                           async_scheduling: bool) -> None:
    kwargs, _, _, blocks, prompt_len, max_tokens, _ = CASES[name]
    engine = _engine(tiny, name, async_scheduling)
    peak = _record_peak_blocks(engine)
    (out,) = run_all(engine, [list(range(1, prompt_len + 1))], _params(name, max_tokens))
    assert len(out.outputs) == kwargs.get("n", 1)
    assert [len(c.token_ids) for c in out.outputs] == [max_tokens] * len(out.outputs)
    assert {c.finish_reason for c in out.outputs} == {"length"}
    assert 0 < peak[0] <= blocks
    if name in ("one_block", "greedy"):
        assert peak[0] == blocks  # the check is tight: the last decode step used every block
    assert engine.block_manager.get_num_free_gpu_blocks() == blocks


@pytest.mark.parametrize("name", list(CASES))
def test_one_token_more_is_refused(tiny: Path, name: str) -> None:
    kwargs, _, _, blocks, prompt_len, max_tokens, needed = CASES[name]
    engine = _engine(tiny, name, async_scheduling=True)
    tokens = prompt_len + max_tokens
    seqs = f" in each of {kwargs['best_of']} sequences" if "best_of" in kwargs else (
        f" in each of {kwargs['n']} sequences" if "n" in kwargs else "")
    with pytest.raises(ValueError, match=(
            rf"^the request needs up to {needed} KV-cache blocks \(the keys and values of "
            rf"{tokens} tokens{seqs}.*\) but the cache has only {blocks}; lower max_tokens")):
        engine.add_request("r", None, _params(name, max_tokens + 1),
                           list(range(1, prompt_len + 1)))
    assert not engine.has_unfinished_requests()


def test_a_single_output_token_needs_only_the_prompt(tiny: Path) -> None:
    """With max_tokens 1 nothing but the prompt is written: a prompt of a whole cache fits;
    swapped prompt chunks (swap mode) want a free block to come back."""
    engine = make_engine(tiny, blocks=2, block_size=8)
    (out,) = run_all(engine, [list(range(1, 17))], _params("greedy", 1))
    assert len(out.outputs[0].token_ids) == 1
    swapping = make_engine(tiny, blocks=2, block_size=8, preemption_mode="swap")
    with pytest.raises(ValueError, match=r"needs up to 3 KV-cache blocks \(the keys and values "
                                         r"of 16 tokens, and a free block per sequence"):
        swapping.add_request("r", None, _params("greedy", 1), list(range(1, 17)))
    (out,) = run_all(swapping, [list(range(1, 10))], _params("greedy", 1))
    assert len(out.outputs[0].token_ids) == 1
