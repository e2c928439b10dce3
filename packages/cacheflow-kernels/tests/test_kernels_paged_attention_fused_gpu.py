"""paged_attention_with_rotary_cache on a CUDA device (skipped without CUDA): the fused launch
against rotary_embedding_with_cache followed by paged_attention, bit for bit (outputs and cache
bytes; for groups of 17-32 query heads, whose unfused small grids run wide CTAs of 16 heads, the
attention kernel with CTAs of 4 warps, CACHEFLOW_PA_WARPS=4), over head sizes, GQA/MQA, FP8
caches, both rotary styles, batch sizes and split plans;
replayed in a CUDA graph behind a kernel that writes the query, key and value under programmatic
dependent launch; and the launches it declines."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

import cacheflow_kernels

from paged_attention_testutil import make_case, quantize_fp8

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rotary_table(max_position: int, head_size: int) -> Any:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_size, 2, dtype=torch.float32,
                                              device="cuda") / head_size)
    angles = torch.arange(max_position, dtype=torch.float32, device="cuda")[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=1).contiguous()


def new_token_slots(case: dict[str, Any]) -> Any:
    bs = case["key_cache"].shape[1]
    tables = case["block_tables"].cpu()
    slots = [int(tables[s, (c - 1) // bs]) * bs + (c - 1) % bs if c else -1
             for s, c in enumerate(case["ctx_lens"])]
    return torch.tensor(slots, dtype=torch.int64, device="cuda")


def step_inputs(case: dict[str, Any], seed: int) -> dict[str, Any]:
    """The step's fused qkv rows (query / key / value as strided views), positions, slots."""
    n, h, d = case["query"].shape
    kvh = case["key_cache"].shape[2]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (torch.randn(n, (h + 2 * kvh) * d, generator=gen, device="cuda") * 2).to(
        case["query"].dtype)
    positions = torch.tensor([max(c - 1, 0) + 3 for c in case["ctx_lens"]], dtype=torch.int64,
                             device="cuda")
    return {"qkv": qkv, "positions": positions, "slots": new_token_slots(case)}


def views(inputs: dict[str, Any], h: int, kvh: int, d: int) -> tuple[Any, Any, Any]:
    qkv = inputs["qkv"]
    n = qkv.shape[0]
    return (qkv[:, : h * d].view(n, h, d), qkv[:, h * d:(h + kvh) * d].view(n, kvh, d),
            qkv[:, (h + kvh) * d:].view(n, kvh, d))


def two_kernels(case: dict[str, Any], inputs: dict[str, Any], table: Any, neox: bool,
                scales: tuple[float, float]) -> None:
    """rotary_embedding_with_cache (on a copy of the qkv rows) then paged_attention; for groups
    of 17-32 query heads with CTAs of 4 warps, whose CTAs of 16 heads give the bits of a fused
    launch's CTAs of 32 (their wide CTAs differ from it by rounding only)."""
    n, h, d = case["query"].shape
    kvh = case["key_cache"].shape[2]
    q, k, v = views({"qkv": inputs["qkv"].clone()}, h, kvh, d)
    cacheflow_kernels.rotary_embedding_with_cache(
        inputs["positions"], q.reshape(n, h * d), k.reshape(n, kvh * d), v.reshape(n, kvh * d),
        table, d, neox, case["key_cache"], case["value_cache"], inputs["slots"], *scales)
    with four_warps(16 < h // kvh <= 32):
        cacheflow_kernels.paged_attention(
            case["out"], q, case["key_cache"], case["value_cache"], case["block_tables"],
            case["context_lens"], case["scale"], k_scale=scales[0], v_scale=scales[1],
            max_context_len=max(case["ctx_lens"]))


@contextlib.contextmanager
def four_warps(on: bool) -> Iterator[None]:
    """CACHEFLOW_PA_WARPS=4 for the calls inside (read at each launch), if ``on``."""
    if not on:
        yield
        return
    old = os.environ.get("CACHEFLOW_PA_WARPS")
    os.environ["CACHEFLOW_PA_WARPS"] = "4"
    try:
        yield
    finally:
        if old is None:
            del os.environ["CACHEFLOW_PA_WARPS"]
        else:
            os.environ["CACHEFLOW_PA_WARPS"] = old


def fused(case: dict[str, Any], inputs: dict[str, Any], table: Any, neox: bool,
          scales: tuple[float, float]) -> bool:
    n, h, d = case["query"].shape
    q, k, v = views(inputs, h, case["key_cache"].shape[2], d)
    return cacheflow_kernels.paged_attention_with_rotary_cache(
        case["out"], q, k, v, case["key_cache"], case["value_cache"], case["block_tables"],
        case["context_lens"], inputs["positions"], inputs["slots"], table, neox, case["scale"],
        max_context_len=max(case["ctx_lens"]), k_scale=scales[0], v_scale=scales[1])


def _copy(case: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _sweep() -> list[tuple[Any, ...]]:
    rng = random.Random(5)
    cases = []
    for head_size in (64, 80, 96, 112, 128, 256):
        for heads in ((8, 8), (32, 4), (32, 1), (16, 1)):
            if heads[0] // heads[1] > (16 if head_size > 128 else 32):
                continue
            dtype = rng.choice(["float16", "bfloat16"])
            fp8 = rng.random() < 0.4
            batch = rng.choice([1, 7, 64])
            neox = rng.random() < 0.6
            block = rng.choice([8, 16, 32])
            cases.append((dtype, fp8, head_size, heads, batch, block, neox))
    return cases


@pytest.mark.parametrize(("dtype", "fp8", "head_size", "heads", "batch", "block", "neox"),
                         _sweep())
def test_fused_matches_the_two_kernels(dtype: str, fp8: bool, head_size: int,
                                       heads: tuple[int, int], batch: int, block: int,
                                       neox: bool) -> None:
    rng = random.Random(head_size * 7 + batch)
    lens = [rng.randint(1, 1500) for _ in range(batch)]  # small batches split the long ones
    lens[0] = 1
    case = make_case(lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     block_size=block, dtype=getattr(torch, dtype), device="cuda", seed=batch)
    for name in ("key_cache", "value_cache"):  # NaN slots would make equal bytes unequal
        case[name] = torch.nan_to_num(case[name].float(), nan=0.5).to(case[name].dtype)
    scales = (1.0, 1.0)
    if fp8:
        scales = (0.5, 2.0)
        case["key_cache"] = quantize_fp8(case["key_cache"], scales[0])
        case["value_cache"] = quantize_fp8(case["value_cache"], scales[1])
    inputs = step_inputs(case, seed=head_size)
    table = rotary_table(1510, head_size)
    want, got = _copy(case), _copy(case)
    two_kernels(want, inputs, table, neox, scales)
    qkv_before = inputs["qkv"].clone()
    assert fused(got, inputs, table, neox, scales)
    torch.cuda.synchronize()
    assert torch.equal(inputs["qkv"], qkv_before)  # query, key and value are only read
    assert torch.equal(got["out"], want["out"])
    for name in ("key_cache", "value_cache"):
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name


@pytest.mark.parametrize("heads", [(32, 32), (32, 4)])
def test_graph_replay_behind_the_kernel_that_writes_qkv(heads: tuple[int, int]) -> None:
    """rms_norm (which releases its successor early under PDL) writes the qkv rows, the fused
    launch reads them: captured once, replayed with new inputs, equal to the eager two-kernel
    path each time."""
    h, kvh, d, block, max_ctx, n = heads[0], heads[1], 128, 16, 448, 4  # never split
    shape_kw = dict(num_heads=h, num_kv_heads=kvh, head_size=d, block_size=block,
                    device="cuda", num_blocks=n * max_ctx // block + 1,
                    max_blocks_per_seq=max_ctx // block)
    static = make_case([max_ctx] * n, seed=0, **shape_kw)
    width = (h + 2 * kvh) * d
    raw = torch.randn(n, width, device="cuda").half()
    weight = torch.randn(width, device="cuda").half()
    inputs = {"qkv": torch.empty(n, width, device="cuda", dtype=torch.float16),
              "positions": torch.zeros(n, dtype=torch.int64, device="cuda"),
              "slots": torch.zeros(n, dtype=torch.int64, device="cuda")}
    table = rotary_table(1024, d)

    def call() -> None:
        cacheflow_kernels.rms_norm(inputs["qkv"], raw, weight, 1e-6)
        assert fused(static, inputs, table, True, (1.0, 1.0))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    rng = random.Random(3)
    for seed in (1, 2, 3):
        lens = [rng.randint(1, max_ctx) for _ in range(n)]
        fresh = make_case(lens, seed=seed, **shape_kw)
        for name in ("key_cache", "value_cache"):
            fresh[name] = torch.nan_to_num(fresh[name], nan=0.5)
        for name in ("key_cache", "value_cache", "block_tables", "context_lens"):
            static[name].copy_(fresh[name])
        static["ctx_lens"] = lens
        step = step_inputs(static, seed)
        inputs["positions"].copy_(step["positions"])
        inputs["slots"].copy_(step["slots"])
        raw.copy_(torch.randn(n, width, device="cuda").half())
        want = _copy(static)
        want_inputs = {**step, "qkv": torch.empty_like(raw)}
        cacheflow_kernels.rms_norm(want_inputs["qkv"], raw, weight, 1e-6)
        static["out"].fill_(float("nan"))
        graph.replay()
        two_kernels(want, want_inputs, table, True, (1.0, 1.0))
        torch.cuda.synchronize()
        assert torch.equal(static["out"], want["out"]), seed
        for name in ("key_cache", "value_cache"):
            assert torch.equal(static[name], want[name]), (seed, name)


def test_long_context_split_launch() -> None:
    """One sequence of 30,000 tokens: the plan splits it; the partition holding the new position
    stores it; equal to the two kernels (split the same way) bit for bit."""
    case = make_case([30000], num_heads=8, num_kv_heads=2, head_size=128, device="cuda",
                     seed=3)
    for name in ("key_cache", "value_cache"):
        case[name] = torch.nan_to_num(case[name], nan=0.5)
    assert cacheflow_kernels.paged_attention_workspace_size(1, 8, 2, 128, 30000,
                                                            device="cuda") > 0
    inputs = step_inputs(case, 5)
    table = rotary_table(30010, 128)
    want, got = _copy(case), _copy(case)
    two_kernels(want, inputs, table, False, (1.0, 1.0))
    assert fused(got, inputs, table, False, (1.0, 1.0))
    torch.cuda.synchronize()
    assert torch.equal(got["out"], want["out"])
    for name in ("key_cache", "value_cache"):
        assert torch.equal(got[name], want[name]), name


def test_declined_launches_do_nothing() -> None:
    """64 query heads per KV head (two CTAs read each K/V row) are declined."""
    case = make_case([5, 9], num_heads=64, num_kv_heads=1, head_size=128, device="cuda", seed=2)
    before = _copy(case)
    assert not fused(case, step_inputs(case, 1), rotary_table(64, 128), True, (1.0, 1.0))
    torch.cuda.synchronize()
    for name in ("out", "key_cache", "value_cache"):
        assert torch.equal(case[name].view(torch.uint8), before[name].view(torch.uint8))
