"""paged_attention on a CUDA device against the float64 oracle (skipped without CUDA).

Every call gets fresh random inputs, a NaN-poisoned output, NaN in every cache slot outside the
contexts and shuffled block tables whose unused entries point at a NaN block. The sweep samples
the cross product of dtypes, head sizes, block sizes, GQA ratios (1, 4, 8, MQA), batch sizes
1..256 and context lengths 1..32k (not multiples of the block size), ALiBi on/off and the split
modes; the whole file is meant to run in well under two minutes on an H100.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

import cacheflow_kernels

from paged_attention_testutil import (
    ARG_ORDER,
    assert_close,
    dequantize_fp8,
    errors,
    make_case,
    oracle,
    oracle_lse,
    quantize_fp8,
)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

DTYPES = ["float16", "bfloat16", "float32"]
HEAD_SIZES = [64, 80, 96, 112, 128, 256]
BLOCK_SIZES = [8, 16, 32]
# (num_heads, num_kv_heads): MHA, GQA-4, GQA-8, MQA (16 and 32 query heads: one CTA per KV head
# on the tensor-core path up to head size 128, 2 CTAs of 16 at 256), GQA-3 (group not a power
# of 2).
HEADS = [(8, 8), (16, 4), (32, 4), (16, 1), (32, 1), (12, 4)]
BATCHES = [1, 2, 7, 33, 64, 256]
MAX_CTX = [1, 9, 100, 513, 2049, 5000]
PARTITIONS: list[int | None] = [None, 0, 64, 256]


def ctx_lens_for(batch: int, max_ctx: int, block_size: int, rng: random.Random) -> list[int]:
    """Random lengths in [1, max_ctx] with the edge cases first: 1, max_ctx, a block multiple,
    one past it, one short of it."""
    special = [1, max_ctx, block_size, block_size + 1, 2 * block_size - 1]
    lens = [min(max(s, 1), max_ctx) for s in special][:batch]
    lens += [rng.randint(1, max_ctx) for _ in range(batch - len(lens))]
    rng.shuffle(lens)
    return lens


def run(case: dict[str, Any], **kwargs: Any) -> Any:
    case["out"].fill_(float("nan"))
    cacheflow_kernels.paged_attention(*(case[n] for n in ARG_ORDER), case["scale"],
                                      case["alibi_slopes"], **kwargs)
    torch.cuda.synchronize()
    return case["out"]


def reference(case: dict[str, Any], sliding_window: int | None = None) -> Any:
    return oracle(case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
                  case["context_lens"], case["scale"], case["alibi_slopes"], sliding_window)


def check(case: dict[str, Any], what: str, sliding_window: int | None = None,
          **kwargs: Any) -> None:
    out = run(case, sliding_window=sliding_window, **kwargs)
    dtype = str(case["query"].dtype).removeprefix("torch.")
    assert_close(out, reference(case, sliding_window), dtype, what)


def test_cuda_available() -> None:
    assert cacheflow_kernels.cuda_available() is True


def _sweep(seed: int = 2024) -> list[tuple[Any, ...]]:
    """A sample of the cross product: every (dtype, head size) and every (block size, heads)
    pair once, the other axes drawn at random (seeded; every value of every axis occurs)."""
    rng = random.Random(seed)
    cases = []
    for dtype, head_size in itertools.product(DTYPES, HEAD_SIZES):
        cases.append((dtype, head_size, rng.choice(BLOCK_SIZES), rng.choice(HEADS),
                      rng.choice(BATCHES), rng.choice(MAX_CTX), rng.random() < 0.5,
                      rng.choice(PARTITIONS)))
    for block_size, heads in itertools.product(BLOCK_SIZES, HEADS):
        cases.append((rng.choice(DTYPES[:2]), rng.choice(HEAD_SIZES), block_size, heads,
                      rng.choice(BATCHES), rng.choice(MAX_CTX), rng.random() < 0.5,
                      rng.choice(PARTITIONS)))
    return cases


SWEEP = _sweep()


@pytest.mark.parametrize(
    ("dtype", "head_size", "block_size", "heads", "batch", "max_ctx", "alibi", "partition"),
    SWEEP,
    ids=[f"{c[0]}-d{c[1]}-bs{c[2]}-h{c[3][0]}kv{c[3][1]}-b{c[4]}-ctx{c[5]}-"
         f"{'alibi' if c[6] else 'noalibi'}-p{c[7]}" for c in SWEEP],
)
def test_sweep(dtype: str, head_size: int, block_size: int, heads: tuple[int, int], batch: int,
               max_ctx: int, alibi: bool, partition: int | None) -> None:
    rng = random.Random(f"{dtype}-{head_size}-{block_size}-{heads}-{batch}-{max_ctx}")
    lens = ctx_lens_for(batch, max_ctx, block_size, rng)
    if batch * max_ctx > 200_000:  # keep the big ones moderate: the oracle loops over sequences
        lens = [min(n, 200_000 // batch) for n in lens]
    case = make_case(lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     block_size=block_size, dtype=getattr(torch, dtype), device="cuda",
                     alibi=alibi, seed=rng.randint(0, 1 << 30), q_scale=rng.choice([0.5, 1, 3]))
    check(case, "sweep", partition_size=partition, max_context_len=max(lens))


@pytest.mark.parametrize(
    ("dtype", "heads", "head_size", "alibi"),
    [("float16", (32, 32), 128, False), ("bfloat16", (32, 4), 128, True),
     ("float32", (16, 1), 64, False), ("float16", (8, 1), 256, True)],
)
def test_single_sequence_32k(dtype: str, heads: tuple[int, int], head_size: int,
                             alibi: bool) -> None:
    """batch 1 at 32k context: the automatic split spreads it over the GPU."""
    n = 32768 - 5
    case = make_case([n], num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     block_size=16, dtype=getattr(torch, dtype), device="cuda", alibi=alibi,
                     seed=11, q_scale=3.0)
    check(case, "32k", max_context_len=32768)
    check(case, "32k default max_context_len")


@pytest.mark.parametrize(("heads", "dtype"), [((32, 32), "float16"), ((32, 4), "float16"),
                                               ((32, 4), "bfloat16")])
def test_benchmark_shape_batch64_ctx2k(heads: tuple[int, int], dtype: str) -> None:
    rng = random.Random(5)
    lens = [2048] * 48 + [rng.randint(1, 2048) for _ in range(16)]
    case = make_case(lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=128,
                     block_size=16, dtype=getattr(torch, dtype), device="cuda", seed=12)
    check(case, "b64 ctx2k", max_context_len=2048)


def test_split_modes_agree() -> None:
    """The same inputs with no split, small and large partitions and the automatic plan."""
    lens = [1, 63, 64, 65, 700, 4095, 4096, 2500]
    case = make_case(lens, num_heads=16, num_kv_heads=2, head_size=128, block_size=8,
                     dtype=torch.float16, device="cuda", seed=13, alibi=True)
    ref = reference(case)
    outs = {}
    for partition in (0, 64, 128, 512, 4096, None):
        outs[partition] = run(case, partition_size=partition, max_context_len=4096).clone()
        assert_close(outs[partition], ref, "float16", f"partition {partition}")
    for partition, out in outs.items():
        rel, _ = errors(out, outs[0].double())
        assert rel < 2e-3, (partition, rel)


@pytest.mark.parametrize("num_seqs", [1, 12])
def test_combine_paths_match_the_reference(num_seqs: int) -> None:
    """MQA with 32 query heads, ~125 partitions of 64 tokens: one sequence gives a combine grid
    of 32 CTAs (at most one per multiprocessor: rows read in slots), twelve give 384 (a column
    per thread). A workspace one float into its allocation (not 16-byte aligned) takes the
    column path at any grid size. Outputs and log-sum-exps match the float64 reference."""
    lens = [8000, 7937, 64, 65, 1, 5000, 6000, 7999, 4097, 3000, 128, 8000][:num_seqs]
    case = make_case(lens, num_heads=32, num_kv_heads=1, head_size=128, block_size=16,
                     dtype=torch.float16, device="cuda", seed=41)
    ref = reference(case)
    ref_lse = oracle_lse(case["query"], case["key_cache"], case["block_tables"],
                         case["context_lens"], case["scale"], case["alibi_slopes"])
    need = cacheflow_kernels.paged_attention_workspace_size(
        num_seqs, 32, 1, 128, 8000, partition_size=64, device="cuda")
    assert need > 0
    for offset in (0, 1):
        ws = torch.full((need + offset,), float("nan"), device="cuda")[offset:]
        lse = torch.full((num_seqs, 32), float("nan"), device="cuda")
        out = run(case, partition_size=64, max_context_len=8000, workspace=ws, lse=lse)
        assert_close(out, ref, "float16", f"b{num_seqs} workspace offset {offset}")
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("partition", [0, 64, None])
def test_sliding_window(partition: int | None) -> None:
    lens = [5000, 17, 4096, 1, 300]
    case = make_case(lens, num_heads=8, num_kv_heads=2, head_size=128, block_size=16,
                     dtype=torch.bfloat16, device="cuda", seed=14, alibi=partition == 64)
    for window in (1, 7, 256, 1000, 4096, 10_000):
        check(case, f"window {window}", sliding_window=window, partition_size=partition)


@pytest.mark.parametrize("partition", [0, 64])
def test_empty_contexts_give_zeros(partition: int) -> None:
    case = make_case([0, 100, 0, 3000], num_heads=8, num_kv_heads=8, head_size=64,
                     device="cuda", seed=15)
    check(case, "empty", partition_size=partition)
    assert (case["out"][0] == 0).all() and (case["out"][2] == 0).all()


def test_empty_batch() -> None:
    case = make_case([], num_heads=4, head_size=64, device="cuda")
    cacheflow_kernels.paged_attention(*(case[n] for n in ARG_ORDER), case["scale"])
    torch.cuda.synchronize()


def test_misaligned_query_is_rejected() -> None:
    case = make_case([10], num_heads=4, head_size=64, device="cuda")
    buf = torch.empty(case["query"].numel() + 1, dtype=torch.float16, device="cuda")
    case["query"] = buf[1:].view(case["query"].shape)
    with pytest.raises(ValueError, match="argument 'query' must be 16-byte aligned"):
        run(case)


def test_runs_on_torch_current_stream() -> None:
    """The query is rewritten on a busy side stream just before the call: a kernel launched on
    any other stream would read the old query."""
    case = make_case([3000, 200], num_heads=32, num_kv_heads=4, head_size=128, device="cuda",
                     seed=16)
    new_query = torch.randn_like(case["query"])
    fresh = dict(case, query=new_query)
    ref = reference(fresh)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        case["query"].copy_(new_query)
        cacheflow_kernels.paged_attention(*(case[n] for n in ARG_ORDER), case["scale"])
    torch.cuda.synchronize()
    assert_close(case["out"], ref, "float16", "side stream")


@pytest.mark.parametrize(
    ("num_seqs", "heads", "max_ctx", "caller_workspace"),
    [(8, (16, 4), 4096, True), (8, (16, 4), 4096, False), (64, (32, 32), 1024, True)],
)
def test_cuda_graph_capture_and_replay(num_seqs: int, heads: tuple[int, int], max_ctx: int,
                                       caller_workspace: bool) -> None:
    """Capture once with max_context_len fixed, replay with a new query, new context_lens
    (shorter and longer) and new block tables and cache contents."""
    num_heads, num_kv_heads = heads
    head_size, block_size = 128, 16
    max_blocks = max_ctx // block_size
    num_blocks = num_seqs * max_blocks + 1
    shape_kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                    block_size=block_size, device="cuda", num_blocks=num_blocks,
                    max_blocks_per_seq=max_blocks, alibi=True)
    rng = random.Random(17)
    static = make_case([rng.randint(1, max_ctx) for _ in range(num_seqs)], seed=0, **shape_kw)
    size = cacheflow_kernels.paged_attention_workspace_size(
        num_seqs, num_heads, num_kv_heads, head_size, max_ctx, device=static["query"].device)
    if num_seqs == 8:
        assert size > 0  # this shape splits
    workspace = None
    if caller_workspace and size:
        workspace = torch.empty(size, dtype=torch.float32, device="cuda")

    def call() -> None:
        cacheflow_kernels.paged_attention(
            *(static[n] for n in ARG_ORDER), static["scale"], static["alibi_slopes"],
            max_context_len=max_ctx, workspace=workspace)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up: loads the library, caches the SM count
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in (1, 2, 3):
        lens = [rng.randint(1, max_ctx) for _ in range(num_seqs)]
        lens[0] = max_ctx if seed == 1 else 1
        fresh = make_case(lens, seed=seed, **shape_kw)
        for name in ("query", "key_cache", "value_cache", "block_tables", "context_lens"):
            static[name].copy_(fresh[name])
        static["out"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static["out"], reference(fresh), "float16", f"replay {seed}")


def test_reads_only_its_blocks_large_batch() -> None:
    """batch 256 with short random contexts: no split, every sequence through its own table."""
    rng = random.Random(18)
    lens = [rng.randint(1, 300) for _ in range(256)]
    case = make_case(lens, num_heads=32, num_kv_heads=8, head_size=128, block_size=32,
                     dtype=torch.bfloat16, device="cuda", seed=19)
    check(case, "batch 256", max_context_len=300)


def test_context_longer_than_table_is_clamped() -> None:
    case = make_case([64, 30], num_heads=4, num_kv_heads=4, head_size=64, block_size=16,
                     device="cuda", seed=20, spare_table_cols=0)
    case["context_lens"][0] = 10_000  # 4 table columns: 64 tokens
    check(case, "clamped")


def test_matches_runtime_reference() -> None:
    """The oracle is the runtime's reference backend for decode steps (when installed)."""
    ref_mod = pytest.importorskip("cacheflow_runtime.attention.reference")
    metadata_mod = pytest.importorskip("cacheflow_runtime.attention.metadata")
    lens = [5, 300, 1000]
    case = make_case(lens, num_heads=16, num_kv_heads=4, head_size=128, block_size=16,
                     dtype=torch.float16, device="cuda", seed=21, alibi=True)
    meta = metadata_mod.InputMetadata(
        query_lens=[1] * len(lens), context_lens_host=lens,
        query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda"),
        context_lens=case["context_lens"], block_tables=case["block_tables"],
        slot_mapping=torch.zeros(len(lens), dtype=torch.int64, device="cuda"),
        logit_indices=torch.arange(len(lens), device="cuda"), is_prompt=False)
    ref = ref_mod.paged_attention(case["query"], case["key_cache"], case["value_cache"], meta,
                                  case["scale"], case["alibi_slopes"])
    out = run(case)
    rel, _ = errors(out, ref.double())
    assert rel < 3e-3, rel


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_second_device_while_first_is_current() -> None:
    case = make_case([700, 20], num_heads=8, num_kv_heads=2, head_size=128, device="cuda:1",
                     seed=22)
    torch.cuda.set_device(0)
    cacheflow_kernels.paged_attention(*(case[n] for n in ARG_ORDER), case["scale"])
    torch.cuda.synchronize(1)
    assert_close(case["out"], reference(case), "float16", "cuda:1")



@pytest.mark.parametrize("partition", [0, 64, None])
@pytest.mark.parametrize(("dtype", "head_size", "heads"), [
    ("float16", 128, (32, 8)), ("bfloat16", 64, (16, 16)), ("bfloat16", 256, (8, 1)),
    ("float32", 96, (12, 4)),
])
def test_log_sum_exp_output(partition: int | None, dtype: str, head_size: int,
                            heads: tuple[int, int]) -> None:
    """``lse`` (split and unsplit) is each row's log-sum-exp of the scores; -inf when empty."""
    case = make_case([0, 1, 700, 3000, 64], num_heads=heads[0], num_kv_heads=heads[1],
                     head_size=head_size, dtype=getattr(torch, dtype), device="cuda", seed=11,
                     q_scale=2.0)
    lse = torch.full(case["query"].shape[:2], float("nan"), device="cuda")
    out = run(case, partition_size=partition, lse=lse)
    ref = oracle_lse(case["query"], case["key_cache"], case["block_tables"],
                     case["context_lens"], case["scale"])
    assert torch.isneginf(lse[0]).all()
    torch.testing.assert_close(lse[1:].double(), ref[1:], rtol=1e-4, atol=2e-3)
    assert_close(out, reference(case), dtype, f"with lse {dtype} d{head_size}")


# ---- The two 16-bit main loops: the shared-memory pipeline (default) and the register kernel
# (CACHEFLOW_PA_PIPELINE=0), forced pipeline depths (CACHEFLOW_PA_STAGES), FP8 caches.

# "pipeline" is the default (two-tile steps where the depth allows, lazy rescaling, the wave
# split plan, CTAs of 32 query heads for groups above 16 where the grid has one per SM, else 16);
# "step8" / "eager" / "split_fill" switch one of those back to the previous kernel's, "rows32"
# forces CTAs of 32 heads (the small grids of these tests otherwise take CTAs of 16), "warps4"
# CTAs of 4 warps (grids of at most one CTA per SM otherwise take wide CTAs).
PIPELINE_ENVS = {
    "pipeline": {},
    "register": {"CACHEFLOW_PA_PIPELINE": "0"},
    "stages2": {"CACHEFLOW_PA_STAGES": "2"},
    "stages8": {"CACHEFLOW_PA_STAGES": "8"},
    "step8": {"CACHEFLOW_PA_STEP": "8"},
    "eager": {"CACHEFLOW_PA_RESCALE_THRESHOLD": "-1"},
    "split_fill": {"CACHEFLOW_PA_SPLIT": "fill"},
    "rows32": {"CACHEFLOW_PA_ROWS": "32"},
    "warps4": {"CACHEFLOW_PA_WARPS": "4"},
}
_ENV_NAMES = sorted({name for env in PIPELINE_ENVS.values() for name in env})


def _set_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    for name in _ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in PIPELINE_ENVS[path].items():
        monkeypatch.setenv(name, value)


def _fp8_case(lens: list[int], dtype: str, head_size: int, heads: tuple[int, int],
              block_size: int, seed: int) -> tuple[dict[str, Any], Any, float, float]:
    case = make_case(lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     block_size=block_size, dtype=getattr(torch, dtype), device="cuda",
                     seed=seed, q_scale=2.0)
    k_scale, v_scale = 0.03, 0.4
    case["key_cache"] = quantize_fp8(case["key_cache"], k_scale)
    case["value_cache"] = quantize_fp8(case["value_cache"], v_scale)
    ref = oracle(case["query"], dequantize_fp8(case["key_cache"], k_scale),
                 dequantize_fp8(case["value_cache"], v_scale), case["block_tables"],
                 case["context_lens"], case["scale"])
    return case, ref, k_scale, v_scale


@pytest.mark.parametrize("path", list(PIPELINE_ENVS))
@pytest.mark.parametrize(("dtype", "head_size", "heads", "block_size"), [
    ("float16", 128, (32, 8), 16), ("bfloat16", 64, (16, 16), 8), ("float16", 80, (8, 1), 32),
    ("bfloat16", 96, (12, 4), 16), ("float16", 112, (8, 2), 8), ("bfloat16", 256, (8, 1), 16),
    ("float16", 128, (32, 1), 16), ("bfloat16", 64, (48, 2), 32),
])
@pytest.mark.parametrize("partition", [0, 64, None])
def test_fp8_cache(monkeypatch: pytest.MonkeyPatch, path: str, dtype: str, head_size: int,
                   heads: tuple[int, int], block_size: int, partition: int | None) -> None:
    """FP8 E4M3 caches with K and V scales, through each main loop and split mode."""
    _set_path(monkeypatch, path)
    lens = [1, 7, 700, 3000, 64, 129]
    case, ref, k_scale, v_scale = _fp8_case(lens, dtype, head_size, heads, block_size, seed=41)
    out = run(case, partition_size=partition, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref, dtype, f"fp8 {path} d{head_size} p{partition}")


@pytest.mark.parametrize("path", list(PIPELINE_ENVS))
@pytest.mark.parametrize(("dtype", "head_size", "heads", "block_size"), [
    ("float16", 128, (32, 32), 16), ("bfloat16", 128, (32, 4), 32), ("float16", 64, (32, 8), 8),
    ("bfloat16", 80, (16, 2), 16), ("float16", 96, (16, 1), 16), ("bfloat16", 112, (8, 8), 8),
    ("float16", 256, (16, 16), 16), ("bfloat16", 128, (32, 1), 16),
])
def test_main_loops_agree(monkeypatch: pytest.MonkeyPatch, path: str, dtype: str,
                          head_size: int, heads: tuple[int, int], block_size: int) -> None:
    """Each main loop against the oracle, unsplit and split, with ALiBi, a sliding window, a
    soft cap and the lse output; contexts shorter than a tile, than 4 warps x 8 stages, not
    multiples of anything, and long enough for many tiles per warp."""
    _set_path(monkeypatch, path)
    lens = [1, 3, 9, 63, 257, 1000, 4097, 2048]
    case = make_case(lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     block_size=block_size, dtype=getattr(torch, dtype), device="cuda", seed=42,
                     alibi=True, q_scale=2.0)
    for partition in (0, 64, None):
        check(case, f"{path} p{partition}", partition_size=partition)
        check(case, f"{path} window p{partition}", sliding_window=300,
              partition_size=partition)
    lse = torch.full(case["query"].shape[:2], float("nan"), device="cuda")
    out = run(case, partition_size=None, logits_soft_cap=6.0, lse=lse)
    args = (case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
            case["context_lens"], case["scale"], case["alibi_slopes"])
    assert_close(out, oracle(*args, logits_soft_cap=6.0), dtype, f"{path} soft cap")
    ref_lse = oracle_lse(case["query"], case["key_cache"], case["block_tables"],
                         case["context_lens"], case["scale"], case["alibi_slopes"],
                         logits_soft_cap=6.0)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("ctas_per_sm", [0.75, 1.5])
@pytest.mark.parametrize(("kind", "heads", "head_size"), [
    ("float16", (32, 1), 128), ("bfloat16", (32, 1), 128), ("fp8-float16", (32, 1), 128),
    ("float16", (24, 2), 64), ("fp8-bfloat16", (12, 1), 96), ("bfloat16", (48, 1), 128),
])
def test_wide_and_half_wide_ctas_match_oracle_and_four_warps(monkeypatch: pytest.MonkeyPatch,
                                                              kind: str, heads: tuple[int, int],
                                                              head_size: int,
                                                              ctas_per_sm: float) -> None:
    """An unsplit grid of up to one CTA per SM (wide CTAs) or of one to two (half-wide CTAs)
    whose KV heads have 9 to 32 query heads in CTAs of 16 (RunWideCtas; wide CTAs also take
    groups of 33-48): the batch is sized from the device's SM count so that the grid falls in
    that range; output against the oracle and against 4-warp CTAs (CACHEFLOW_PA_WARPS=4)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    groups_per_seq = heads[1] * -(-heads[0] // heads[1] // 16)  # 16-row CTAs per sequence
    batch = max(1, int(ctas_per_sm * sms / groups_per_seq))
    lens = ctx_lens_for(batch, 700, 16, random.Random(5))
    dtype = kind.removeprefix("fp8-")
    if kind.startswith("fp8"):
        case, ref, ks, vs = _fp8_case(lens, dtype, head_size, heads, 16, seed=47)
    else:
        case = make_case(lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                         dtype=getattr(torch, dtype), device="cuda", seed=47, q_scale=2.0)
        ref, ks, vs = reference(case), 1.0, 1.0
    _set_path(monkeypatch, "pipeline")
    monkeypatch.setenv("CACHEFLOW_PA_ROWS", "16")
    wide = run(case, partition_size=0, k_scale=ks, v_scale=vs).clone()
    assert_close(wide, ref, dtype, f"wide at {ctas_per_sm} CTAs per SM {kind}")
    monkeypatch.setenv("CACHEFLOW_PA_WARPS", "4")
    four = run(case, partition_size=0, k_scale=ks, v_scale=vs)
    assert_close(wide, four.double(), dtype, f"wide vs 4 warps {kind}")


@pytest.mark.parametrize("fp8", [False, True])
def test_pipeline_cuda_graph_and_register_path_agree(monkeypatch: pytest.MonkeyPatch,
                                                     fp8: bool) -> None:
    """A CUDA graph captured with the pipelined kernel replays with new contexts, and the
    register kernel gives the same result on the same inputs."""
    lens = [4096, 1, 77, 3000, 2500, 8, 4095, 1024]
    if fp8:
        case, ref, ks, vs = _fp8_case(lens, "float16", 128, (32, 8), 16, seed=43)
    else:
        case = make_case(lens, num_heads=32, num_kv_heads=8, head_size=128, device="cuda",
                         seed=43)
        ref, ks, vs = reference(case), 1.0, 1.0
    ws = torch.empty(cacheflow_kernels.paged_attention_workspace_size(
        8, 32, 8, 128, 4096, device=case["query"].device) + 1, dtype=torch.float32,
        device="cuda")

    def call() -> None:
        cacheflow_kernels.paged_attention(*(case[n] for n in ARG_ORDER), case["scale"],
                                          max_context_len=4096, workspace=ws,
                                          k_scale=ks, v_scale=vs)

    _set_path(monkeypatch, "pipeline")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    case["out"].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(case["out"], ref, "float16", "graph replay")
    pipelined = case["out"].clone()
    _set_path(monkeypatch, "register")
    case["out"].fill_(float("nan"))
    call()
    torch.cuda.synchronize()
    assert_close(case["out"], ref, "float16", "register kernel")
    rel, _ = errors(case["out"], pipelined.double())
    assert rel < 2e-3, rel


@pytest.mark.parametrize("threshold", ["-1", "0", "8", "15"])
@pytest.mark.parametrize(("dtype", "fp8"), [("float16", False), ("bfloat16", True)])
def test_lazy_rescale_with_jumping_scores(monkeypatch: pytest.MonkeyPatch, threshold: str,
                                          dtype: str, fp8: bool) -> None:
    """Two-tile steps with eager (-1) and lazy rescaling (CACHEFLOW_PA_RESCALE_THRESHOLD) on
    scores whose running max jumps late in long contexts (keys that are multiples of a query
    head), split and unsplit."""
    _set_path(monkeypatch, "pipeline")
    monkeypatch.setenv("CACHEFLOW_PA_RESCALE_THRESHOLD", threshold)
    lens = [5000, 700, 33, 2048]
    case = make_case(lens, num_heads=32, num_kv_heads=8, head_size=128, device="cuda",
                     dtype=getattr(torch, dtype), seed=44)
    kc, bs = case["key_cache"], case["key_cache"].shape[1]
    for s, n in enumerate(lens):
        for i, pos in enumerate(range(n // 7, n, max(1, n // 5))):
            blk = int(case["block_tables"][s, pos // bs])
            for kvh in range(8):
                q = case["query"][s, kvh * 4].float()
                kc[blk, pos % bs, kvh] = (q * (0.25 * (i + 1))
                                          + 0.1 * kc[blk, pos % bs, kvh].float()).to(kc.dtype)
    ks, vs = 1.0, 1.0
    if fp8:
        ks, vs = 0.05, 0.4
        case["key_cache"] = quantize_fp8(case["key_cache"], ks)
        case["value_cache"] = quantize_fp8(case["value_cache"], vs)
        ref = oracle(case["query"], dequantize_fp8(case["key_cache"], ks),
                     dequantize_fp8(case["value_cache"], vs), case["block_tables"],
                     case["context_lens"], case["scale"])
    else:
        ref = reference(case)
    for partition in (0, None):
        out = run(case, partition_size=partition, k_scale=ks, v_scale=vs)
        assert_close(out, ref, dtype, f"threshold {threshold} p{partition}")


# ---- CTAs of 32 query heads (CACHEFLOW_PA_ROWS) and strided queries.


@pytest.mark.parametrize(("dtype", "head_size", "heads", "fp8"), [
    ("float16", 128, (32, 1), False), ("bfloat16", 128, (64, 2), True),
    ("float16", 64, (40, 1), False), ("bfloat16", 80, (24, 1), False),
    ("float16", 96, (32, 1), True), ("float16", 112, (96, 4), False),
    ("float16", 256, (32, 1), False),  # head size 256 keeps CTAs of 16
])
def test_two_row_tiles_agree_with_sixteen_rows(monkeypatch: pytest.MonkeyPatch, dtype: str,
                                               head_size: int, heads: tuple[int, int],
                                               fp8: bool) -> None:
    """Groups above 16 query heads: CTAs of 32 (the default) and of 16 (CACHEFLOW_PA_ROWS=16)
    both match the oracle, unsplit and split, with ALiBi; unsplit they agree bit for bit with
    CTAs of 4 warps (CACHEFLOW_PA_WARPS=4; this small grid otherwise runs wide CTAs of 16 for
    groups up to 32, also checked against the oracle), split within the dtype's rounding."""
    _set_path(monkeypatch, "pipeline")
    lens = [1, 15, 300, 4097, 2048]
    if fp8:
        case, ref, ks, vs = _fp8_case(lens, dtype, head_size, heads, 16, seed=45)
    else:
        case = make_case(lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                         dtype=getattr(torch, dtype), device="cuda", seed=45, alibi=True,
                         q_scale=2.0)
        ref, ks, vs = reference(case), 1.0, 1.0
    monkeypatch.setenv("CACHEFLOW_PA_ROWS", "16")
    wide = run(case, partition_size=0, k_scale=ks, v_scale=vs)
    assert_close(wide, ref, dtype, "rows 16, wide CTAs where the group allows")
    monkeypatch.setenv("CACHEFLOW_PA_WARPS", "4")
    for partition in (0, None):
        outs = []
        for rows in ("32", "16"):
            monkeypatch.setenv("CACHEFLOW_PA_ROWS", rows)
            outs.append(run(case, partition_size=partition, k_scale=ks, v_scale=vs).clone())
            assert_close(outs[-1], ref, dtype, f"rows {rows} p{partition}")
        if partition == 0:  # the same partitions: the same per-row arithmetic
            assert torch.equal(outs[0], outs[1])
        else:  # the split plans differ (CTAs of 32 plan other partitions)
            rel, _ = errors(outs[0], outs[1].double())
            assert rel < {"float16": 1e-3, "bfloat16": 8e-3}[dtype], rel


def _fused_qkv_query(query: Any, extra_heads: int) -> Any:
    """query as the first heads of a fused QKV output's rows (strided sequence rows), the rest
    of each row NaN."""
    n, h, d = query.shape
    fused = torch.full((n, (h + extra_heads) * d), float("nan"), dtype=query.dtype,
                       device=query.device)
    view = fused[:, : h * d].view(n, h, d)
    view.copy_(query)
    return view


@pytest.mark.parametrize("path", ["pipeline", "register", "rows32"])
@pytest.mark.parametrize(("dtype", "head_size", "heads"), [
    ("float16", 128, (32, 8)), ("bfloat16", 64, (32, 1)), ("float32", 96, (8, 2)),
])
def test_strided_query_rows(monkeypatch: pytest.MonkeyPatch, path: str, dtype: str,
                            head_size: int, heads: tuple[int, int]) -> None:
    """A query viewed in a fused QKV output gives bit for bit the result of its contiguous
    copy (the NaN between the rows is never read), unsplit and split, also in a CUDA graph."""
    _set_path(monkeypatch, path)
    case = make_case([5, 700, 3000, 64], num_heads=heads[0], num_kv_heads=heads[1],
                     head_size=head_size, dtype=getattr(torch, dtype), device="cuda", seed=46)
    for partition in (0, None):  # max_context_len as in the graph below: the same plan
        dense = run(case, partition_size=partition, max_context_len=3000).clone()
        assert_close(dense, reference(case), dtype, f"{path} contiguous")
        strided = dict(case, query=_fused_qkv_query(case["query"], 2 * heads[1]))
        assert torch.equal(run(strided, partition_size=partition, max_context_len=3000), dense)
    ws = torch.empty(cacheflow_kernels.paged_attention_workspace_size(
        4, heads[0], heads[1], head_size, 3000, device=case["query"].device) + 1,
        dtype=torch.float32, device="cuda")
    strided["out"].fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()

    def call() -> None:
        cacheflow_kernels.paged_attention(*(strided[n] for n in ARG_ORDER), strided["scale"],
                                          max_context_len=3000, workspace=ws)

    call()  # warm-up (checks remembered) outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        call()
    strided["out"].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(strided["out"], dense)


def test_query_row_stride_must_keep_16_byte_rows() -> None:
    case = make_case([10, 20], num_heads=4, head_size=64, device="cuda")
    fused = torch.zeros(2, 4 * 64 + 4, dtype=torch.float16, device="cuda")  # 520-byte rows
    case["query"] = fused[:, : 4 * 64].view(2, 4, 64)
    with pytest.raises(ValueError, match="row stride is a multiple of 16 bytes"):
        run(case)
