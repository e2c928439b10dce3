"""The engine's token counters (the server's ``cacheflow_prompt_tokens`` and
``cacheflow_generation_tokens``) count what a workload asked for, as vLLM's do: each request's
whole prompt once (prefix-cached and recomputed tokens alike), and every sampled token of every
sequence (``n`` and ``best_of`` included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM

ONE_TORCH_THREAD = True  # see conftest.py


@pytest.mark.parametrize("kv_cache_blocks", [None, 12], ids=["roomy", "preempting"])
def test_counters_match_the_workload(tiny_path: Path, kv_cache_blocks: int | None) -> None:
    llm = LLM(tiny_path, device="cpu", dtype="float32", block_size=8,
              kv_cache_blocks=kv_cache_blocks, enable_prefix_caching=True)
    long_prompt = {"prompt_token_ids": [7 + i % 50 for i in range(40)]}
    work = [
        (long_prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)),
        (long_prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)),  # cached
        ({"prompt_token_ids": [5, 6, 7, 8, 9]},
         SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=6, ignore_eos=True)),
        ({"prompt_token_ids": [9, 8, 7]},
         SamplingParams(best_of=3, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)),
    ]
    engine = llm.engine
    outs = []
    for prompt, params in work:  # one by one, so that the second prompt hits the cache
        outs += llm.generate(prompt, params, use_tqdm=False)
    assert outs[1].num_cached_tokens > 0
    assert engine.num_prompt_tokens == 40 + 40 + 5 + 3
    assert sum(len(c.token_ids) for o in outs for c in o.outputs) == 4 + 4 + 18 + 5
    assert engine.num_generation_tokens == 4 + 4 + 18 + 15  # best_of's two dropped too
    if kv_cache_blocks is not None:
        batch = llm.generate([p for p, _ in work], [s for _, s in work], use_tqdm=False)
        assert engine.scheduler.num_preemptions > 0
        assert engine.num_prompt_tokens == 2 * (40 + 40 + 5 + 3)
        assert engine.num_generation_tokens == 2 * (4 + 4 + 18 + 15)
        assert [len(c.token_ids) for o in batch for c in o.outputs] == \
            [len(c.token_ids) for o in outs for c in o.outputs]
