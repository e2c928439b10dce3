"""Seeded requests through the engine: the noise is a hash of (seed key, position, vocabulary
index) computed where the logits are (seeded_noise.py), so a seed gives the same tokens alone,
in any batch, in either scheduling order and after a preemption, and another seed others."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_testutil import EOS, make_engine, run_all

from cacheflow_runtime import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [3, 14, 15, 9, 2, 6]


def _seeded(seed: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=1.3, top_p=0.95, seed=seed, max_tokens=24,
                          ignore_eos=True, **kwargs)  # type: ignore[arg-type]


def _others(n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Unseeded, greedy and penalized requests to put around the seeded ones."""
    prompts = [[(5 * i + j) % EOS for j in range(2 + i % 7)] for i in range(n)]
    kinds = [SamplingParams(temperature=0.9, max_tokens=30, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True),
             SamplingParams(temperature=0.7, presence_penalty=0.5, max_tokens=21,
                            ignore_eos=True)]
    return prompts, [kinds[i % 3] for i in range(n)]


def _tokens(outputs: list) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in out.outputs] for out in outputs]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_seed_gives_its_tokens_alone_and_in_any_batch(tiny: Path,
                                                        async_scheduling: bool) -> None:
    """Seeded requests (one sequence, a penalty, parallel samples) give the tokens they give
    alone when other requests surround them, in another order, with another engine seed."""
    seeded = [_seeded(7), _seeded(8, presence_penalty=0.4), _seeded(9, n=2, best_of=2)]
    alone = [_tokens(run_all(make_engine(tiny, async_scheduling=async_scheduling),
                             [PROMPT], [p]))[0] for p in seeded]
    prompts, params = _others(9)
    batch = run_all(make_engine(tiny, async_scheduling=async_scheduling),
                    prompts[:4] + [PROMPT] * 3 + prompts[4:],
                    params[:4] + seeded + params[4:])
    assert _tokens(batch[4:7]) == alone
    reordered = run_all(make_engine(tiny, async_scheduling=not async_scheduling),
                        [PROMPT] * 3 + prompts, list(reversed(seeded)) + params)
    assert _tokens(reordered[:3]) == list(reversed(alone))


def test_a_preempted_seeded_request_draws_the_same_tokens(tiny: Path) -> None:
    """Recomputed after a preemption, a seeded request continues with the tokens it draws in
    a roomy cache."""
    prompts, params = _others(6)
    params = [_seeded(11 + i) for i in range(len(prompts))]
    roomy = run_all(make_engine(tiny, blocks=256), prompts, params)
    engine = make_engine(tiny, blocks=12)
    tight = run_all(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert _tokens(tight) == _tokens(roomy)


def test_other_seeds_give_other_tokens(tiny: Path) -> None:
    """Different seeds, and the samples of one parallel request, draw different tokens; the
    same seed in two requests of one batch draws the same ones."""
    outputs = _tokens(run_all(make_engine(tiny), [PROMPT] * 5,
                              [_seeded(1), _seeded(2), _seeded(3), _seeded(1),
                               _seeded(4, n=3, best_of=3)]))
    assert outputs[0] == outputs[3]
    assert len({tuple(out[0]) for out in outputs[:3]}) == 3
    assert len({tuple(seq) for seq in outputs[4]}) == 3
