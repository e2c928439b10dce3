"""Cascade attention (attention/cascade.py) on the CPU: the split at the shared blocks, the
log-sum-exp merge and the step planning, against plain decode attention; then whole engines
whose decode steps run it, against the same engines without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_testutil import make_engine, run_all

from cacheflow_runtime import SamplingParams
from cacheflow_runtime.attention import build_input_metadata, cascade, reference
from cacheflow_runtime.attention.reference import quantize_fp8


def _case(num_seqs: int, shared_blocks: int, own_lens: list[int], num_heads: int,
          num_kv_heads: int, head_size: int = 16, block_size: int = 8, fp8: bool = False,
          seed: int = 0) -> dict[str, Any]:
    """Caches and block tables where every sequence starts with the same ``shared_blocks``
    blocks, then ``own_lens[s]`` tokens in blocks of its own."""
    gen = torch.Generator().manual_seed(seed)
    own_blocks = [-(-n // block_size) for n in own_lens]
    num_blocks = shared_blocks + sum(own_blocks) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    if fp8:
        k, v = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    shared = perm[:shared_blocks]
    rest = perm[shared_blocks:]
    tables, ctx = [], []
    for s, n in enumerate(own_lens):
        mine, rest = rest[:own_blocks[s]], rest[own_blocks[s]:]
        tables.append(shared + mine)
        ctx.append(shared_blocks * block_size + n)
    return dict(query=torch.randn(num_seqs, num_heads, head_size, generator=gen) * 2,
                key_cache=k, value_cache=v, tables=tables, ctx=ctx, block_size=block_size,
                k_scale=k_scale, v_scale=v_scale)


def _plain(case: dict[str, Any], scale: float) -> torch.Tensor:
    n = len(case["ctx"])
    meta = build_input_metadata([1] * n, case["ctx"], case["tables"], [0] * n, list(range(n)),
                                torch.device("cpu"))
    return reference.paged_attention(case["query"], case["key_cache"], case["value_cache"],
                                     meta, scale, k_scale=case["k_scale"],
                                     v_scale=case["v_scale"])


@pytest.fixture
def low_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cascade for any batch of 2+ sequences sharing one block or more."""
    monkeypatch.setattr(cascade, "MIN_SEQS", 2)
    monkeypatch.setattr(cascade, "MIN_PREFIX_TOKENS", 1)
    monkeypatch.setattr(cascade, "MIN_SAVED_TOKEN_READS", 0)


@pytest.mark.parametrize(("heads", "fp8"), [((4, 4), False), ((8, 2), False), ((6, 1), True)])
def test_cascade_equals_plain_decode(low_thresholds: None, heads: tuple[int, int],
                                     fp8: bool) -> None:
    case = _case(5, 3, [1, 9, 16, 2, 30], *heads, fp8=fp8)
    scale = 16 ** -0.5
    meta = build_input_metadata([1] * 5, case["ctx"], case["tables"], [0] * 5, list(range(5)),
                                torch.device("cpu"), cascade_block_size=8)
    plan = meta.cascade
    assert plan is not None and plan.num_tokens == 24
    assert plan.block_ids.tolist() == case["tables"][0][:3]
    assert plan.context_lens.tolist() == [1, 9, 16, 2, 30] and plan.max_context_len == 30
    assert plan.block_tables[:, 0].tolist() == [t[3] for t in case["tables"]]
    out = cascade.cascade_decode(reference, case["query"], case["key_cache"],
                                 case["value_cache"], plan, scale, case["k_scale"],
                                 case["v_scale"])
    torch.testing.assert_close(out, _plain(case, scale), rtol=1e-5, atol=1e-5)


def test_prefix_attention_log_sum_exp() -> None:
    case = _case(3, 2, [1, 1, 1], 4, 2)
    ids = torch.tensor(case["tables"][0][:2])
    out, lse = cascade.prefix_attention(case["query"], case["key_cache"], case["value_cache"],
                                        ids, 0.25)
    keys = case["key_cache"][ids].reshape(16, 2, 16).repeat_interleave(2, dim=1)
    values = case["value_cache"][ids].reshape(16, 2, 16).repeat_interleave(2, dim=1)
    scores = torch.einsum("shd,khd->shk", case["query"], keys) * 0.25
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, torch.einsum("shk,khd->shd", scores.softmax(-1), values))


def test_merge_of_an_empty_side_is_the_other_side() -> None:
    a = torch.randn(3, 4, 8)
    lse_a = torch.randn(3, 4)
    empty = torch.full((3, 4), float("-inf"))
    torch.testing.assert_close(cascade.merge_attention(a, lse_a, torch.zeros(3, 4, 8), empty), a)


def test_reference_decode_with_lse_of_empty_context() -> None:
    case = _case(2, 1, [3, 4], 4, 2)
    tables = torch.tensor([t[:2] for t in case["tables"]], dtype=torch.int32)
    out, lse = reference.decode_with_lse(case["query"], case["key_cache"], case["value_cache"],
                                         tables, torch.tensor([0, 5]), 5, 0.25)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isfinite(lse[1]).all()


def test_plan_finds_the_shared_run_and_its_limits(low_thresholds: None) -> None:
    tables = torch.tensor([[5, 6, 7, 8, 1], [5, 6, 7, 9, 2], [5, 6, 3, 8, 4]], dtype=torch.int32)
    assert cascade.common_prefix_blocks(tables, 5) == 2
    # Rows that agree on a later block but not an earlier one share only what precedes it.
    assert cascade.common_prefix_blocks(tables[[0, 2]], 5) == 2
    assert cascade.common_prefix_blocks(tables[:2], 5) == 3
    assert cascade.common_prefix_blocks(tables[:2], 1) == 1
    # The sequence's own token stays in its suffix: a shared last block is not part of it.
    same = torch.tensor([[4, 2], [4, 2]], dtype=torch.int32)
    plan = cascade.plan_cascade([1, 1], [16, 16], same, 8, torch.device("cpu"))
    assert plan is not None and plan.num_tokens == 8 and plan.context_lens.tolist() == [8, 8]
    assert cascade.plan_cascade([1, 1], [8, 16], same, 8, torch.device("cpu")) is None
    # Prefill steps never cascade.
    assert cascade.plan_cascade([2, 1], [17, 17], tables[:2], 8, torch.device("cpu")) is None


def test_default_thresholds() -> None:
    cpu = torch.device("cpu")
    shared = list(range(64))  # 512 tokens of 8
    tables = torch.tensor([shared + [100 + i] for i in range(65)], dtype=torch.int32)
    plan = cascade.plan_cascade([1] * 65, [515] * 65, tables, 8, cpu)  # 64 * 512 reads saved
    assert plan is not None and plan.num_tokens == 512
    assert cascade.plan_cascade([1] * 64, [515] * 64, tables[:64], 8, cpu) is None
    # Too few sequences, too short a prefix, too few redundant reads: plain decode.
    assert cascade.plan_cascade([1] * 7, [515] * 7, tables[:7], 8, cpu) is None
    short = torch.tensor([list(range(20)) + [100 + i] for i in range(64)], dtype=torch.int32)
    assert cascade.plan_cascade([1] * 64, [163] * 64, short, 8, cpu) is None
    assert cascade.plan_cascade([1] * 16, [515] * 16, tables[:16], 8, cpu) is None


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=10, ignore_eos=True),
    SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=8, ignore_eos=True),
], ids=["greedy", "seeded-n3", "beam"])
def test_engine_outputs_with_and_without_cascade(tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                                 params: SamplingParams) -> None:
    """Prompts that share 3 full blocks (prefix caching) and n > 1 / beam forks: the engine
    gives the same tokens when its decode steps use cascade attention, which they do."""
    shared = [(7 * i) % 26 for i in range(27)]
    prompts = [shared + [(3 * j + i) % 26 for i in range(j % 4 + 1)] for j in range(6)]

    def run() -> list[Any]:
        engine = make_engine(tiny)
        run_all(engine, prompts[:1], SamplingParams(temperature=0, max_tokens=1))  # caches it
        return [[c.token_ids for c in o.outputs] for o in run_all(engine, prompts, params)]

    monkeypatch.setattr(cascade, "MIN_SEQS", 10 ** 9)
    plain = run()
    monkeypatch.setattr(cascade, "MIN_SEQS", 2)
    monkeypatch.setattr(cascade, "MIN_PREFIX_TOKENS", 8)
    monkeypatch.setattr(cascade, "MIN_SAVED_TOKEN_READS", 0)
    calls = []
    real = cascade.cascade_decode

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args[4].num_tokens)
        return real(*args, **kwargs)

    monkeypatch.setattr(cascade, "cascade_decode", counting)
    assert run() == plain
    assert calls and max(calls) >= 24


def test_only_models_with_a_plain_layer_plan_cascade() -> None:
    """Cascade steps run eagerly, so a model whose every layer is windowed or soft-capped (it
    could not use one) never plans them."""
    from cacheflow_runtime.attention import PagedAttention
    from cacheflow_runtime.model_executor.model_runner import ModelRunner

    def runner(*layers: PagedAttention) -> ModelRunner:
        return ModelRunner(torch.nn.ModuleList(layers), torch.device("cpu"), 8, None, None)

    windowed = PagedAttention(4, 16, 0.25, sliding_window=64)
    capped = PagedAttention(4, 16, 0.25, logits_soft_cap=30.0)
    plain = PagedAttention(4, 16, 0.25)
    assert runner(windowed, capped).plan_cascade is False
    assert runner(windowed, plain).plan_cascade is True
