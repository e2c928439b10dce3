"""paged_attention's kernels (csrc/paged_attention.cuh, unchanged) run on the CPU under the fiber
emulation of tests/emulation/paged_attention_emu.h, against the float64 oracle.

This checks, without a GPU, the index maps of the tensor-core fragments (head sizes with and
without a 32/64 remainder), masking at context, partition and block boundaries, the warps'
online-softmax merge, split-K and its merge kernel, GQA/MQA head groups, ALiBi and the sliding
window; the emulator also aborts on an out-of-bounds or misaligned global access and on a
collective in divergent code. Needs a C++17 compiler with _Float16 (g++ >= 12).

float16/bfloat16 run the shared-memory pipelined kernel by default (the emulated device has an
H100's shared memory; its cp.async copies land as late as the PTX ISA allows, so a read before
the wait or the warp barrier sees stale bytes); ``pipeline`` tests also run with copies landing
at issue (a copy into a stage still to be read overwrites it), with forced depths, and the
register kernel (the fallback, ``stages=0``).
"""

from __future__ import annotations

import ctypes
from typing import Any

import emulator_builds
import pytest

from cacheflow_kernels._attention_ops import plan_partitions

from paged_attention_testutil import (
    assert_close,
    dequantize_fp8,
    errors,
    make_case,
    oracle,
    oracle_lse,
    quantize_fp8,
)

torch = pytest.importorskip("torch")

DTYPES = {"float16": 0, "bfloat16": 1, "float32": 2}
_c = ctypes
_ARGTYPES = (
    [_c.c_int] + [_c.c_void_p] * 8 + [_c.c_int64] * 8 + [_c.c_double] + [_c.c_int64] * 3
    + [_c.c_void_p] + [_c.c_double] * 3 + [_c.c_void_p]
)


# The emulator's helper entry points (cf_emu_<name>): name -> (restype, argtypes); build_emulator
# binds each as an attribute of the returned kernel function.
_HELPERS: dict[str, tuple[Any, list[Any]]] = {
    "configure": (ctypes.c_int, [ctypes.c_int] * 6),
    "set_step": (None, [ctypes.c_int, ctypes.c_double]),
    "last_launch": (None, [ctypes.POINTER(ctypes.c_int)] * 2),
    "set_layout": (None, [ctypes.c_int, ctypes.c_int64, ctypes.c_int]),
    "set_cta_order": (None, [ctypes.c_int]),
    "set_new_token": (None, [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
                      + [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_int]),
    "last_rows": (ctypes.c_int, []),
    "main_warps": (ctypes.c_int, []),
    "set_wide_warps": (None, [ctypes.c_int]),
    "set_half_wide": (None, [ctypes.c_int]),
    "set_wide_max_group": (None, [ctypes.c_int]),
    "ldsm_v": (ctypes.c_int, []),
    "fp8_f16_mma": (ctypes.c_int, []),
    "tokens_m": (ctypes.c_int, []),
    "main_tokens_m": (ctypes.c_int, []),
    "movmatrix": (None, [ctypes.c_void_p] * 2),
}


PA_SOURCE = ("paged_attention_emu.cc", "-DCACHEFLOW_PAGED_ATTENTION_EMULATE")
EMULATOR_BUILDS = [PA_SOURCE]  # started as collection ends (conftest.py)


def build_emulator(*defines: str) -> Any:
    """The kernels compiled under the emulation (with the extra ``-D`` options ``defines``, as
    the CMake build options set them; once per session, see emulator_builds.py): the launch
    function with the emulator's controls as attributes."""
    lib = emulator_builds.library((*PA_SOURCE, *defines))
    dll = ctypes.CDLL(str(lib))
    fn = dll.cf_emu_paged_attention
    fn.restype = ctypes.c_int
    fn.argtypes = _ARGTYPES
    for name, (restype, argtypes) in _HELPERS.items():
        helper = getattr(dll, f"cf_emu_{name}")
        helper.restype, helper.argtypes = restype, argtypes
        setattr(fn, name, helper)
    return fn


@pytest.fixture(scope="module")
def emu() -> Any:
    """The kernels as the default build compiles them."""
    return build_emulator()


def test_default_build_options(emu: Any) -> None:
    """The GPU-measured defaults: CACHEFLOW_PA_FP8_F16_MMA and CACHEFLOW_PA_TOKENS_M on,
    CACHEFLOW_PA_LDSM_V off, unless the build asks otherwise."""
    assert (emu.ldsm_v(), emu.fp8_f16_mma(), emu.tokens_m()) == (0, 1, 1)


H100_SMEM = (233472, 232448)  # shared memory per SM and per CTA (opt-in), bytes
LATE, EARLY = 1, 0  # when the emulated cp.async copies land


def configure(emu: Any, *, mode: int = LATE, stages: int = -1, smem: tuple[int, int] = H100_SMEM,
              dtype: int = 0, head_size: int = 128) -> int:
    """Sets the emulator's cp.async mode, Params::stages (-1 auto, 0 register kernel, >= 2
    forced) and device shared memory for the next runs; returns the depth the dispatch picks for
    (dtype code, head_size) with 16 query heads per CTA (0: the register kernel)."""
    return emu.configure(mode, stages, smem[0], smem[1], dtype, head_size)


DEFAULT_STEP, DEFAULT_THRESHOLD = 2, 8.0  # kDefaultStepTiles, kDefaultRescaleThreshold


def set_step(emu: Any, step_tiles: int = DEFAULT_STEP,
             threshold: float = DEFAULT_THRESHOLD) -> None:
    """Params::step_tiles (1: one 8-token tile per warp step, 2: two) and the two-tile step's
    lazy-rescale threshold (< 0: eager) of the next runs."""
    emu.set_step(step_tiles, threshold)


def last_launch(emu: Any) -> tuple[int, int]:
    """(stages, step_tiles) the dispatch used at the last launch (stages 0: register kernel)."""
    stages, step = ctypes.c_int(), ctypes.c_int()
    emu.last_launch(ctypes.byref(stages), ctypes.byref(step))
    return stages.value, step.value


DEFAULT_CTA_ROWS = 0  # kDefaultCtaRows = kCtaRowsAuto (32 rows with no minimum grid)


@pytest.fixture(autouse=True)
def _default_pipeline(emu: Any) -> Any:
    configure(emu)
    set_step(emu)
    emu.set_layout(DEFAULT_CTA_ROWS, 0, 0)
    emu.set_cta_order(0)
    emu.set_wide_warps(0)
    emu.set_half_wide(0)
    yield
    configure(emu)
    set_step(emu)
    emu.set_layout(DEFAULT_CTA_ROWS, 0, 0)
    emu.set_cta_order(0)
    emu.set_wide_warps(0)
    emu.set_half_wide(0)


def _ptr(x: Any) -> int | None:
    return None if x is None else x.data_ptr()


def run_emulated(
    emu: Any, case: dict[str, Any], *, partition_size: int = 0,
    max_context_len: int | None = None, sliding_window: int = 0,
    k_scale: float = 1.0, v_scale: float = 1.0, logits_soft_cap: float = 0.0,
    lse: Any = None, workspace_offset: int = 0,
) -> int:
    """Runs the op on the case's CPU tensors (writes case['out'], and ``lse`` when given: float32
    [num_seqs, num_heads]); returns num_partitions. float8_e4m3fn caches are dequantized with
    ``k_scale`` / ``v_scale``. The workspace starts ``workspace_offset`` floats into its
    allocation (1: not 16-byte aligned)."""
    q, kc = case["query"], case["key_cache"]
    num_seqs, num_heads, head_size = q.shape
    num_blocks, block_size, num_kv_heads, _ = kc.shape
    max_blocks = case["block_tables"].shape[1]
    max_ctx = max_blocks * block_size if max_context_len is None else max_context_len
    need = ctypes.c_int64(0)
    dtype = DTYPES[str(q.dtype).removeprefix("torch.")]
    if kc.dtype == torch.float8_e4m3fn:
        dtype += 4
    plan = (num_seqs, num_heads, head_size, num_kv_heads, num_blocks, block_size, max_blocks,
            case["scale"], max_ctx, partition_size, sliding_window)
    # First ask for the plan and the workspace size (nothing runs with out=None).
    scales = (k_scale, v_scale, logits_soft_cap)
    parts = emu(dtype, None, None, None, None, None, None, None, None, 0, *plan,
                ctypes.byref(need), *scales, None)
    ws = torch.full((max(need.value, 1) + workspace_offset,), float("nan"))[workspace_offset:]
    ran = emu(dtype, _ptr(case["out"]), _ptr(q), _ptr(kc), _ptr(case["value_cache"]),
              _ptr(case["block_tables"]), _ptr(case["context_lens"]),
              _ptr(case["alibi_slopes"]), _ptr(ws), need.value, *plan, None, *scales, _ptr(lse))
    assert ran == parts
    assert parts >= 1
    return parts


def check(emu: Any, case: dict[str, Any], *, sliding_window: int = 0, **kwargs: Any) -> int:
    parts = run_emulated(emu, case, sliding_window=sliding_window, **kwargs)
    ref = oracle(case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
                 case["context_lens"], case["scale"], case["alibi_slopes"],
                 sliding_window or None)
    dtype = str(case["query"].dtype).removeprefix("torch.")
    assert_close(case["out"], ref, dtype, f"{kwargs} window={sliding_window}")
    return parts


# (dtype, head_size, block_size, (num_heads, num_kv_heads), ctx_lens, partition, alibi, window)
SWEEP = [
    ("float16", 64, 16, (4, 4), [1, 17, 40], 0, False, 0),
    ("float16", 80, 8, (8, 2), [33, 9, 70], 64, True, 0),
    ("float16", 96, 32, (6, 1), [65, 3], 0, False, 0),
    ("float16", 112, 16, (8, 1), [100, 31], 64, False, 0),
    ("float16", 128, 8, (32, 4), [129, 5, 64], 64, True, 0),
    ("float16", 256, 16, (4, 2), [45, 90], 0, False, 20),
    ("bfloat16", 64, 32, (16, 2), [200, 1], 128, False, 0),
    ("bfloat16", 80, 16, (2, 2), [17, 8, 9], 0, True, 0),
    ("bfloat16", 96, 8, (12, 4), [77, 128], 64, False, 50),
    ("bfloat16", 112, 32, (4, 4), [1, 2, 63], 0, False, 0),
    ("bfloat16", 128, 16, (20, 1), [150], 64, True, 0),
    ("bfloat16", 256, 8, (8, 8), [23, 24], 64, False, 0),
    ("float32", 64, 8, (4, 1), [30, 61], 0, True, 0),
    ("float32", 80, 16, (4, 4), [65, 2], 64, False, 0),
    ("float32", 96, 32, (9, 3), [100], 0, False, 33),
    ("float32", 112, 8, (2, 2), [9, 16], 0, False, 0),
    ("float32", 128, 16, (16, 2), [140, 7], 64, True, 0),
    ("float32", 256, 32, (10, 1), [40], 0, False, 0),
]


@pytest.mark.parametrize(
    ("dtype", "head_size", "block_size", "heads", "ctx_lens", "partition", "alibi", "window"),
    SWEEP,
    ids=[f"{c[0]}-d{c[1]}-bs{c[2]}-h{c[3][0]}kv{c[3][1]}-p{c[5]}" for c in SWEEP],
)
def test_matches_oracle(
    emu: Any, dtype: str, head_size: int, block_size: int, heads: tuple[int, int],
    ctx_lens: list[int], partition: int, alibi: bool, window: int,
) -> None:
    case = make_case(ctx_lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     block_size=block_size, dtype=getattr(torch, dtype), alibi=alibi,
                     seed=head_size + block_size, q_scale=2.0)
    parts = check(emu, case, partition_size=partition, sliding_window=window)
    capacity = case["block_tables"].shape[1] * block_size  # max_context_len's default
    assert parts == (max(1, -(-capacity // partition)) if partition else 1)


def test_split_matches_unsplit_and_uses_many_partitions(emu: Any) -> None:
    """11 partitions (odd count for the merge loop); contexts ending on and off boundaries."""
    base = make_case([700, 64, 129, 1], num_heads=8, num_kv_heads=2, head_size=64,
                     dtype=torch.float32, alibi=True, seed=3)
    unsplit = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
    assert run_emulated(emu, unsplit, partition_size=0) == 1
    assert check(emu, base, partition_size=64, max_context_len=700) == 11
    torch.testing.assert_close(base["out"], unsplit["out"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("head_size", "ctx", "parts", "workspace_offset"), [
    (128, 1100, 18, 0), (64, 4000, 63, 0), (256, 1100, 18, 0), (256, 4500, 71, 0),
    (64, 4200, 66, 0), (80, 3300, 52, 0), (128, 4160, 65, 0), (128, 8500, 133, 0),
    (96, 11000, 172, 0), (128, 4160, 65, 1), (96, 1100, 18, 1),
])
def test_merge_of_many_partitions_matches_unsplit(
    emu: Any, head_size: int, ctx: int, parts: int, workspace_offset: int,
) -> None:
    """The combine kernel reads a partition row with head_size / 4 threads (16-byte loads), as
    many rows side by side as its threads hold, 8 per thread in flight, the first 8 before the
    weights: 128 threads where that is one round (18 <= 32 rows at d128, 63 <= 64 at d64), else
    512 (slots of 8, 16, 21, 25 and 32 rows at head sizes 256, 128, 96, 80 and 64), in one round
    with a remainder or in two (71 > 64 at d256, 133 > 128 at d128, 172 > 168 at d96). A
    workspace that is not 16-byte aligned takes the column-per-thread path. Outputs and
    log-sum-exps match the unsplit launch."""
    base = make_case([ctx, 70], num_heads=2, num_kv_heads=1, head_size=head_size,
                     dtype=torch.float16, seed=head_size)
    unsplit = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
    lse_unsplit = torch.full((2, 2), float("nan"))
    lse_split = torch.full((2, 2), float("nan"))
    assert run_emulated(emu, unsplit, partition_size=0, lse=lse_unsplit) == 1
    assert check(emu, base, partition_size=64, max_context_len=ctx, lse=lse_split,
                 workspace_offset=workspace_offset) == parts
    torch.testing.assert_close(base["out"], unsplit["out"], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse_split, lse_unsplit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("partition", [0, 64])
def test_output_rows_not_aligned_for_vector_stores(emu: Any, dtype: str, partition: int) -> None:
    """The epilogue stores four outputs at once where the output (or a split launch's workspace)
    is aligned for it; an output view starting one element into its allocation takes element
    stores (the emulator aborts on a misaligned store), with the same values as an aligned
    one."""
    base = make_case([150, 37], num_heads=8, num_kv_heads=2, head_size=80,
                     dtype=getattr(torch, dtype), seed=11)
    aligned = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
    out = base["out"]
    shifted = torch.full((out.numel() + 1,), float("nan"), dtype=out.dtype)[1:].view(out.shape)
    base["out"] = shifted
    parts = check(emu, base, partition_size=partition)
    assert parts == (1 if partition == 0 else 3)
    assert check(emu, aligned, partition_size=partition) == parts
    torch.testing.assert_close(base["out"], aligned["out"], rtol=0, atol=0)
    if partition:  # partials stored element by element into a workspace view off 16 bytes
        assert check(emu, aligned, partition_size=partition, workspace_offset=1) == parts


def test_empty_contexts_give_zeros(emu: Any) -> None:
    for partition in (0, 64):
        case = make_case([0, 5, 0, 300], num_heads=4, num_kv_heads=2, head_size=64, seed=4)
        check(emu, case, partition_size=partition)
        assert (case["out"][0] == 0).all() and (case["out"][2] == 0).all()


def test_all_contexts_empty(emu: Any) -> None:
    case = make_case([0, 0], num_heads=4, head_size=128, seed=5)
    check(emu, case, partition_size=0)
    assert (case["out"] == 0).all()


@pytest.mark.parametrize("partition", [0, 64, 128])
def test_sliding_window(emu: Any, partition: int) -> None:
    """Windows shorter than, equal to and longer than the contexts; window starts that are not
    multiples of 8 and partitions entirely before the window."""
    case = make_case([300, 31, 8, 129], num_heads=4, num_kv_heads=1, head_size=80,
                     dtype=torch.bfloat16, seed=6, alibi=True)
    for window in (1, 7, 31, 100, 1000):
        case["out"].fill_(float("nan"))
        check(emu, case, partition_size=partition, sliding_window=window)


def test_long_context_block_table_chunks(emu: Any) -> None:
    """More than 32 tiles per warp (the block-number cache reloads) in one partition."""
    case = make_case([1100], num_heads=2, num_kv_heads=1, head_size=64, block_size=8, seed=7)
    check(emu, case, partition_size=0)


def test_contexts_clamped_to_block_table(emu: Any) -> None:
    """context_lens past max_blocks_per_seq * block_size are clamped (never read past the
    table); the oracle clamps the same way."""
    case = make_case([48, 16], num_heads=4, head_size=64, block_size=16, seed=8,
                     spare_table_cols=0)
    case["context_lens"][0] = 1000  # the table has 3 columns: 48 tokens
    check(emu, case, partition_size=0)


def test_max_context_len_below_table_capacity(emu: Any) -> None:
    case = make_case([90, 200, 3], num_heads=8, num_kv_heads=8, head_size=96, seed=9,
                     spare_table_cols=20)
    assert check(emu, case, partition_size=64, max_context_len=200) == 4


def test_automatic_plan(emu: Any) -> None:
    """The wrapper's automatic split for a small batch on a 132-SM device."""
    case = make_case([3000, 700], num_heads=4, num_kv_heads=4, head_size=64, seed=10)
    size, parts = plan_partitions(2, 4, 4, 3000, 132, head_size=64)
    assert parts > 1 and size % 64 == 0
    assert check(emu, case, partition_size=size, max_context_len=3000) == parts


# (dtype, head_size, block_size, (num_heads, num_kv_heads), ctx_lens, partition)
FP8_SWEEP = [
    ("float16", 64, 16, (4, 4), [1, 17, 40], 0),
    ("float16", 80, 8, (8, 2), [33, 70], 64),
    ("bfloat16", 112, 16, (8, 1), [100, 31], 64),
    ("bfloat16", 128, 8, (16, 4), [129, 5], 0),
    ("float16", 256, 16, (4, 2), [45, 90], 64),
    ("float32", 96, 32, (9, 3), [100], 0),
]


@pytest.mark.parametrize(
    ("dtype", "head_size", "block_size", "heads", "ctx_lens", "partition"), FP8_SWEEP,
    ids=[f"{c[0]}-d{c[1]}-bs{c[2]}-h{c[3][0]}kv{c[3][1]}-p{c[5]}" for c in FP8_SWEEP],
)
def test_fp8_cache_matches_oracle(
    emu: Any, dtype: str, head_size: int, block_size: int, heads: tuple[int, int],
    ctx_lens: list[int], partition: int,
) -> None:
    """FP8 E4M3 caches with K and V scales: the kernel dequantizes on read; the oracle sees the
    same dequantized values, so only the kernel's own rounding is left."""
    case = make_case(ctx_lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     block_size=block_size, dtype=getattr(torch, dtype), seed=head_size + 1)
    k_scale, v_scale = 0.02, 0.5
    case["key_cache"] = quantize_fp8(case["key_cache"], k_scale)
    case["value_cache"] = quantize_fp8(case["value_cache"], v_scale)
    run_emulated(emu, case, partition_size=partition, k_scale=k_scale, v_scale=v_scale)
    ref = oracle(case["query"], dequantize_fp8(case["key_cache"], k_scale),
                 dequantize_fp8(case["value_cache"], v_scale), case["block_tables"],
                 case["context_lens"], case["scale"])
    assert_close(case["out"], ref, dtype, f"fp8 d{head_size}")


@pytest.mark.parametrize(("dtype", "partition"), [("float16", 0), ("bfloat16", 64),
                                                  ("float32", 0)])
def test_logits_soft_cap(emu: Any, dtype: str, partition: int) -> None:
    """cap * tanh(score / cap) with scores well past the cap (q_scale 8): capped and uncapped
    results differ, and the kernel matches the capped oracle."""
    case = make_case([70, 129], num_heads=8, num_kv_heads=2, head_size=128,
                     dtype=getattr(torch, dtype), seed=11, q_scale=8.0)
    cap = 5.0
    run_emulated(emu, case, partition_size=partition, logits_soft_cap=cap)
    args = (case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
            case["context_lens"], case["scale"])
    ref = oracle(*args, logits_soft_cap=cap)
    assert_close(case["out"], ref, dtype, "soft cap")
    uncapped = oracle(*args)
    assert float((ref - uncapped).abs().max()) > 0.1


@pytest.mark.parametrize("partition", [0, 64])
@pytest.mark.parametrize(("dtype", "extras"), [
    ("float16", {}), ("bfloat16", {"alibi": True}), ("float32", {"window": 40}),
    ("bfloat16", {"cap": 5.0}),
])
def test_log_sum_exp_output(emu: Any, partition: int, dtype: str, extras: dict[str, Any]) -> None:
    """``lse`` holds each row's log-sum-exp of the final scores (split or not, ALiBi, window,
    soft cap), -inf for empty contexts; the output is unchanged by asking for it."""
    case = make_case([0, 150, 9, 64], num_heads=8, num_kv_heads=2, head_size=64,
                     dtype=getattr(torch, dtype), alibi=extras.get("alibi", False), seed=21,
                     q_scale=2.0)
    window, cap = extras.get("window", 0), extras.get("cap", 0.0)
    lse = torch.full(case["query"].shape[:2], float("nan"))
    run_emulated(emu, case, partition_size=partition, sliding_window=window,
                 logits_soft_cap=cap, lse=lse)
    ref = oracle_lse(case["query"], case["key_cache"], case["block_tables"],
                     case["context_lens"], case["scale"], case["alibi_slopes"], window or None,
                     cap or None)
    assert torch.isneginf(lse[0]).all()
    torch.testing.assert_close(lse[1:].double(), ref[1:], rtol=1e-4, atol=2e-3)
    out_ref = oracle(case["query"], case["key_cache"], case["value_cache"],
                     case["block_tables"], case["context_lens"], case["scale"],
                     case["alibi_slopes"], window or None, cap or None)
    assert_close(case["out"], out_ref, dtype, "with lse")


# ---- The pipelined kernel: ring edge cases, both cp.async orders, forced depths, the fallback.

DTYPE_CODES = {"float16": 0, "bfloat16": 1, "fp8-float16": 4, "fp8-bfloat16": 5}


def _pipeline_case(kind: str, head_size: int, ctx_lens: list[int], *, block_size: int = 16,
                   heads: tuple[int, int] = (8, 2), seed: int = 0, alibi: bool = False,
                   ) -> tuple[dict[str, Any], dict[str, float], str]:
    dtype = kind.removeprefix("fp8-")
    case = make_case(ctx_lens, num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     block_size=block_size, dtype=getattr(torch, dtype), seed=seed, alibi=alibi,
                     q_scale=2.0)
    scales: dict[str, float] = {}
    if kind.startswith("fp8-"):
        scales = {"k_scale": 0.03, "v_scale": 0.4}
        case["key_cache"] = quantize_fp8(case["key_cache"], scales["k_scale"])
        case["value_cache"] = quantize_fp8(case["value_cache"], scales["v_scale"])
    return case, scales, dtype


def _check_pipeline(emu: Any, case: dict[str, Any], scales: dict[str, float], dtype: str,
                    what: str, *, sliding_window: int = 0, **kwargs: Any) -> int:
    lse = torch.full(case["query"].shape[:2], float("nan"))
    parts = run_emulated(emu, case, sliding_window=sliding_window, lse=lse, **scales, **kwargs)
    kc, vc = case["key_cache"], case["value_cache"]
    if scales:
        kc = dequantize_fp8(kc, scales["k_scale"])
        vc = dequantize_fp8(vc, scales["v_scale"])
    args = (case["query"], kc, vc, case["block_tables"], case["context_lens"], case["scale"],
            case["alibi_slopes"], sliding_window or None)
    assert_close(case["out"], oracle(*args), dtype, what)
    ref_lse = oracle_lse(case["query"], kc, case["block_tables"], case["context_lens"],
                         case["scale"], case["alibi_slopes"], sliding_window or None)
    nonempty = torch.tensor([n > 0 for n in case["ctx_lens"]])
    torch.testing.assert_close(lse[nonempty].double(), ref_lse[nonempty], rtol=1e-4, atol=2e-3)
    assert torch.isneginf(lse[~nonempty]).all()
    return parts


# (kind, head_size, block_size, ctx_lens, partition, stages): contexts shorter than one tile, a
# single partial block, shorter than stages x 8 tokens (warps with no tile or one), not multiples
# of the tile or of 4 warps x stages tiles, longer than 32 tiles per warp (block-number chunks
# reload while copies are in flight), many partitions, every head size and both element sizes.
PIPELINE_CASES = [
    ("float16", 128, 16, [1, 7, 9, 15], 0, -1),
    ("float16", 128, 16, [3], 0, 8),
    ("bfloat16", 64, 8, [5, 31, 33, 97], 0, 2),
    ("float16", 80, 32, [17, 63, 70], 0, 3),
    ("bfloat16", 96, 16, [130, 2, 47], 64, -1),
    ("float16", 112, 8, [200, 41], 64, 5),
    ("bfloat16", 256, 16, [90, 13], 0, -1),
    ("float16", 256, 8, [47, 111], 64, 2),
    ("float16", 64, 8, [1100, 250], 0, 7),
    ("bfloat16", 128, 32, [700, 1, 65], 64, -1),
    ("fp8-float16", 128, 16, [1, 9, 40, 300], 0, -1),
    ("fp8-bfloat16", 64, 8, [77, 8, 16, 1], 64, 8),
    ("fp8-float16", 80, 16, [55, 129], 0, 2),
    ("fp8-bfloat16", 96, 32, [33, 160], 64, 4),
    ("fp8-float16", 112, 16, [100, 31], 0, -1),
    ("fp8-bfloat16", 256, 8, [24, 90], 64, 3),
    ("fp8-float16", 128, 8, [1100], 0, 6),
]


@pytest.mark.parametrize("mode", [LATE, EARLY], ids=["late", "early"])
@pytest.mark.parametrize(
    ("kind", "head_size", "block_size", "ctx_lens", "partition", "stages"), PIPELINE_CASES,
    ids=[f"{c[0]}-d{c[1]}-bs{c[2]}-p{c[4]}-s{c[5]}" for c in PIPELINE_CASES],
)
def test_pipeline_matches_oracle(emu: Any, mode: int, kind: str, head_size: int,
                                 block_size: int, ctx_lens: list[int], partition: int,
                                 stages: int) -> None:
    used = configure(emu, mode=mode, stages=stages, dtype=DTYPE_CODES[kind], head_size=head_size)
    assert used >= 2  # the pipelined kernel runs
    if stages >= 2:
        assert used == stages
    case, scales, dtype = _pipeline_case(kind, head_size, ctx_lens, block_size=block_size,
                                         seed=head_size + len(ctx_lens),
                                         alibi=partition > 0)
    _check_pipeline(emu, case, scales, dtype, f"{kind} d{head_size} stages {used}",
                    partition_size=partition)
    # Two-tile steps (the default) wherever the ring has >= 4 stages, one-tile steps below.
    assert last_launch(emu) == (used, 2 if used >= 4 else 1)


# A subset of PIPELINE_CASES with one-tile steps forced (CACHEFLOW_PA_STEP=8: the kernel of
# 2026-12-03) at depths that would take two-tile steps.
ONE_TILE_CASES = [c for c in PIPELINE_CASES if c[5] not in (2, 3)][::2]


@pytest.mark.parametrize(
    ("kind", "head_size", "block_size", "ctx_lens", "partition", "stages"), ONE_TILE_CASES,
    ids=[f"{c[0]}-d{c[1]}-bs{c[2]}-p{c[4]}-s{c[5]}" for c in ONE_TILE_CASES],
)
def test_one_tile_steps_match_oracle(emu: Any, kind: str, head_size: int, block_size: int,
                                     ctx_lens: list[int], partition: int, stages: int) -> None:
    used = configure(emu, stages=stages, dtype=DTYPE_CODES[kind], head_size=head_size)
    set_step(emu, 1)
    case, scales, dtype = _pipeline_case(kind, head_size, ctx_lens, block_size=block_size,
                                         seed=head_size + 7, alibi=True)
    _check_pipeline(emu, case, scales, dtype, f"{kind} d{head_size} one-tile steps",
                    partition_size=partition)
    assert last_launch(emu) == (used, 1)


def _jumping_scores_case(kind: str, head_size: int, ctx: int, *, seed: int,
                         ) -> tuple[dict[str, Any], dict[str, float], str]:
    """A case whose running max jumps late in the context: a few keys are multiples of the
    first query head of their group (scores ~10-40 log2 units above the rest), at positions
    spread over the context in increasing strength, so rows rescale after many tokens were
    accumulated (and, with a threshold, some increases stay below it)."""
    dtype = kind.removeprefix("fp8-")
    case = make_case([ctx, ctx // 2 + 3], num_heads=8, num_kv_heads=2, head_size=head_size,
                     dtype=getattr(torch, dtype), seed=seed, q_scale=1.0)
    bs = case["key_cache"].shape[1]
    group = 4
    for s, n in enumerate(case["ctx_lens"]):
        for i, pos in enumerate(range(n // 7, n, max(1, n // 5))):
            blk = int(case["block_tables"][s, pos // bs])
            for kvh in range(2):
                q = case["query"][s, kvh * group].float()
                k = q * (0.25 * (i + 1)) + 0.1 * case["key_cache"][blk, pos % bs, kvh].float()
                case["key_cache"][blk, pos % bs, kvh] = k.to(case["key_cache"].dtype)
    scales: dict[str, float] = {}
    if kind.startswith("fp8-"):
        scales = {"k_scale": 0.05, "v_scale": 0.4}
        case["key_cache"] = quantize_fp8(case["key_cache"], scales["k_scale"])
        case["value_cache"] = quantize_fp8(case["value_cache"], scales["v_scale"])
    return case, scales, dtype


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 3.0, 8.0, 15.0])
@pytest.mark.parametrize(("kind", "head_size", "partition"), [
    ("float16", 128, 0), ("bfloat16", 64, 64), ("fp8-float16", 128, 0),
])
def test_lazy_rescale_thresholds(emu: Any, threshold: float, kind: str, head_size: int,
                                 partition: int) -> None:
    """Two-tile steps with eager (< 0) and lazy rescaling: the running max moves only when a
    score exceeds it by more than the threshold; output and log-sum-exp match the oracle for
    scores that jump late in the context (rescaling after many accumulated tokens, increases
    below and above the threshold)."""
    set_step(emu, 2, threshold)
    case, scales, dtype = _jumping_scores_case(kind, head_size, 300, seed=40 + head_size)
    _check_pipeline(emu, case, scales, dtype, f"threshold {threshold}",
                    partition_size=partition)
    assert last_launch(emu)[1] == 2


def test_two_tile_steps_need_four_stages(emu: Any) -> None:
    """Depths 2 and 3 keep one-tile steps (the two-tile ring needs 4 stages); the default
    depth of fp16 at head size 256 (3 stages on an H100) too."""
    case, scales, dtype = _pipeline_case("float16", 256, [90, 41], seed=50)
    for stages, step in ((2, 1), (3, 1), (4, 2), (-1, 1)):
        configure(emu, stages=stages, dtype=0, head_size=256)
        case["out"].fill_(float("nan"))
        _check_pipeline(emu, case, scales, dtype, f"stages {stages}", partition_size=0)
        assert last_launch(emu)[1] == step


@pytest.mark.parametrize("mode", [LATE, EARLY], ids=["late", "early"])
@pytest.mark.parametrize("stages", [2, 8])
def test_pipeline_window_many_partitions(emu: Any, mode: int, stages: int) -> None:
    """A sliding window (starts off the tile grid, partitions wholly before it) and 17
    partitions of 64 tokens: every CTA is short, most warps get one or two tiles."""
    configure(emu, mode=mode, stages=stages)
    case, scales, dtype = _pipeline_case("bfloat16", 128, [1050, 300, 64, 5], heads=(4, 1),
                                         seed=30, alibi=True)
    for window in (0, 13, 200):
        case["out"].fill_(float("nan"))
        parts = _check_pipeline(emu, case, scales, dtype, f"window {window}",
                                sliding_window=window, partition_size=64, max_context_len=1050)
        assert parts == 17


@pytest.mark.parametrize("kind", ["float16", "fp8-bfloat16"])
def test_pipeline_soft_cap_and_empty_contexts(emu: Any, kind: str) -> None:
    configure(emu, stages=3)
    case, scales, dtype = _pipeline_case(kind, 128, [0, 70, 0, 129], seed=31)
    lse = torch.full(case["query"].shape[:2], float("nan"))
    run_emulated(emu, case, partition_size=64, logits_soft_cap=4.0, lse=lse, **scales)
    kc, vc = case["key_cache"], case["value_cache"]
    if scales:
        kc = dequantize_fp8(kc, scales["k_scale"])
        vc = dequantize_fp8(vc, scales["v_scale"])
    ref = oracle(case["query"], kc, vc, case["block_tables"], case["context_lens"],
                 case["scale"], logits_soft_cap=4.0)
    assert_close(case["out"], ref, dtype, "soft cap")
    assert (case["out"][0] == 0).all() and (case["out"][2] == 0).all()
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[2]).all()


@pytest.mark.parametrize(("kind", "head_size", "partition"), [
    ("float16", 64, 0), ("bfloat16", 80, 64), ("float16", 96, 0), ("bfloat16", 112, 0),
    ("float16", 128, 64), ("bfloat16", 256, 0), ("fp8-float16", 128, 64),
    ("fp8-bfloat16", 80, 0),
])
def test_register_kernel_fallback(emu: Any, kind: str, head_size: int, partition: int) -> None:
    """stages=0 (CACHEFLOW_PA_PIPELINE=0 on the GPU) runs the register kernel; it agrees with
    the oracle and with the pipelined kernel on the same inputs."""
    case, scales, dtype = _pipeline_case(kind, head_size, [150, 9, 64], block_size=16, seed=32)
    assert configure(emu, stages=0, dtype=DTYPE_CODES[kind], head_size=head_size) == 0
    _check_pipeline(emu, case, scales, dtype, "register kernel", partition_size=partition)
    register_out = case["out"].clone()
    assert configure(emu, stages=-1, dtype=DTYPE_CODES[kind], head_size=head_size) >= 2
    _check_pipeline(emu, case, scales, dtype, "pipelined kernel", partition_size=partition)
    rel, _ = errors(case["out"], register_out.double())
    assert rel < {"float16": 2e-3, "bfloat16": 1.2e-2}[dtype]


def test_stage_choice(emu: Any) -> None:
    """The depth comes from the device's shared memory: the register-limited CTAs per SM keep
    fitting (3 at d128, 2 at d256, 4 up to d96), with fewer CTAs only when two stages do not
    fit, and never more than 6 stages unless forced; unknown shared memory (0) or too little
    selects the register kernel."""
    h100 = H100_SMEM
    a100 = (167936, 166912)
    small = (102400, 101376)  # sm_86 / sm_89
    # H100 / H200: fp16 d128 4 stages (70 KB, 3 CTAs/SM), fp8 d128 the automatic maximum 6
    # (8 would fit).
    assert configure(emu, smem=h100, dtype=0, head_size=128) == 4
    assert configure(emu, smem=h100, dtype=4, head_size=128) == 6
    assert configure(emu, smem=(1 << 20, 1 << 20), dtype=0, head_size=128) == 6
    assert configure(emu, smem=h100, dtype=0, head_size=256) == 3
    assert configure(emu, smem=h100, dtype=1, head_size=64) == 6
    for dtype, head_size in [(0, 64), (0, 96), (1, 128), (0, 256), (4, 128), (5, 256)]:
        per_cta = {64: 4, 96: 4, 128: 3, 256: 2}[head_size]
        for smem in (h100, a100):
            s = configure(emu, smem=smem, dtype=dtype, head_size=head_size)
            assert 2 <= s <= 6
            # the chosen depth keeps per_cta CTAs in the SM's shared memory
            assert configure(emu, smem=(smem[0] // per_cta, smem[1]), dtype=dtype,
                             head_size=head_size) in range(2, s + 1)
    assert configure(emu, smem=a100, dtype=0, head_size=128) == 3
    assert configure(emu, smem=small, dtype=0, head_size=128) == 2
    assert configure(emu, smem=(0, 0), dtype=0, head_size=128) == 0  # unknown device
    assert configure(emu, smem=(16384, 16384), dtype=0, head_size=128) == 0  # too small
    assert configure(emu, stages=0, dtype=0, head_size=128) == 0
    assert configure(emu, stages=5, dtype=0, head_size=128) == 5
    assert configure(emu, stages=20, dtype=0, head_size=128) == 8
    assert configure(emu, stages=8, smem=(65536, 65536), dtype=0, head_size=256) == 0
    assert configure(emu, stages=8, smem=(102400, 101376), dtype=0, head_size=256) == 2
    assert configure(emu, dtype=2, head_size=128) == 0  # float32: its own CUDA-core kernel


# ---- CTAs of 32 query heads (two m16 row tiles per warp) and strided queries.


@pytest.mark.parametrize(("kind", "head_size", "heads", "ctx_lens", "partition"), [
    ("float16", 128, (32, 1), [300, 5], 0),        # MQA with 32 heads: one CTA per sequence
    ("fp8-bfloat16", 80, (48, 2), [150, 77], 64),  # 24 per KV head; half span and tail tiles
    ("bfloat16", 64, (40, 1), [129], 0),           # 40 = a CTA of 32 and one of 8 heads
])
def test_two_row_tiles_match_oracle_and_sixteen_rows(emu: Any, kind: str, head_size: int,
                                                      heads: tuple[int, int],
                                                      ctx_lens: list[int], partition: int) -> None:
    """Groups of more than 16 query heads run CTAs of 32 (CACHEFLOW_PA_ROWS=32, the default):
    each warp carries two m16 row tiles over the same K/V fragments. They match the oracle
    (output and log-sum-exp, ALiBi included) and CTAs of 16 heads bit for bit."""
    case, scales, dtype = _pipeline_case(kind, head_size, ctx_lens, heads=heads,
                                         seed=60 + head_size, alibi=True)
    _check_pipeline(emu, case, scales, dtype, f"{kind} 32-row CTAs", partition_size=partition)
    group = heads[0] // heads[1]
    assert emu.last_rows() == min(group, 32)
    assert last_launch(emu)[1] == 2
    rows32 = case["out"].clone()
    emu.set_layout(16, 0, 0)
    case["out"].fill_(float("nan"))
    _check_pipeline(emu, case, scales, dtype, f"{kind} 16-row CTAs", partition_size=partition)
    assert emu.last_rows() == min(group, 16)
    # Same partitions, same per-row arithmetic: bit for bit the same output.
    assert torch.equal(case["out"], rows32)


@pytest.mark.parametrize(("heads", "ctx_lens", "partition"), [
    ((32, 1), [300, 70, 5], 0),     # 3 sequences x 1 KV head: 3 CTAs of 32
    ((48, 1), [150, 9, 77], 64),    # 3 x 1 x 2 head groups (32 + 16): 6 CTAs of 32, split
])
def test_automatic_rows_follow_the_grid(emu: Any, heads: tuple[int, int], ctx_lens: list[int],
                                        partition: int) -> None:
    """The default (kCtaRowsAuto) takes CTAs of 32 query heads only where the unsplit grid of
    such CTAs has at least wide_rows_min_ctas of them (the device's SM count on the GPU), and
    CTAs of 16 below that; both match the oracle and each other bit for bit."""
    case, scales, dtype = _pipeline_case("bfloat16", 128, ctx_lens, heads=heads, seed=62)
    group = heads[0] // heads[1]
    wide_ctas = len(ctx_lens) * heads[1] * -(-group // 32)
    outs = []
    for min_ctas, rows in ((wide_ctas, 32), (wide_ctas + 1, 16)):
        emu.set_layout(0, 0, min_ctas)
        case["out"].fill_(float("nan"))
        _check_pipeline(emu, case, scales, dtype, f"auto rows, minimum {min_ctas}",
                        partition_size=partition)
        assert emu.last_rows() == rows
        outs.append(case["out"].clone())
    assert torch.equal(outs[0], outs[1])


def test_automatic_rows_keep_fused_launches_whole(emu: Any) -> None:
    """A fused launch (the new token stored by the CTA of its KV head) keeps CTAs of 32 heads
    under the automatic choice whatever the grid, where CTAs of 16 would decline it."""
    case = make_case([129, 8], num_heads=32, num_kv_heads=1, head_size=96, dtype=torch.float16,
                     seed=63, q_scale=2.0)
    key = torch.randn(2, 96).to(torch.float16)
    value = torch.randn(2, 96).to(torch.float16)
    positions = torch.tensor([128, 7], dtype=torch.int64)
    table = rotary_table(200, 96)
    emu.set_layout(0, 0, 1 << 20)
    assert run_fused(emu, _clone(case), key, value, positions, new_token_slots(case), table,
                     True) == 1
    assert emu.last_rows() == 32
    emu.set_layout(16, 0, 0)
    assert run_fused(emu, _clone(case), key, value, positions, new_token_slots(case), table,
                     True) == -2


def _without_pair_steps(emu: Any, case: dict[str, Any], scales: dict[str, float], dtype: str,
                        observe: Any) -> list[Any]:
    """Runs the case (checked against the oracle) with one-tile steps, then with the two-tile
    step on a ring forced to 3 stages; returns ``observe()`` after each run."""
    seen = []
    set_step(emu, 1)
    _check_pipeline(emu, case, scales, dtype, "one-tile steps")
    seen.append(observe())
    set_step(emu)
    configure(emu, stages=3)
    _check_pipeline(emu, case, scales, dtype, "3 stages")
    seen.append(observe())
    configure(emu)
    return seen


def test_two_row_tiles_need_pair_steps(emu: Any) -> None:
    """One-tile steps, forced shallow rings and head size 256 keep CTAs of 16 heads."""
    case, scales, dtype = _pipeline_case("float16", 128, [70], heads=(32, 1), seed=61)
    assert _without_pair_steps(emu, case, scales, dtype, emu.last_rows) == [16, 16]


# ---- Wide CTAs: one CTA per SM with the warps of several (grids of at most one CTA per SM).

ANY_GRID = 1 << 20  # wide_warps_max_ctas that every test grid is under


@pytest.mark.parametrize(("kind", "head_size", "heads", "ctx_lens", "window", "rows", "warps"), [
    ("float16", 64, (8, 2), [300, 5, 129], 0, 0, 16),    # most warps of the 5-token CTA see no
                                                         # tile
    ("bfloat16", 128, (16, 1), [400, 70], 0, 0, 12),
    ("fp8-float16", 96, (8, 1), [257, 64], 100, 0, 16),  # FP8, sliding window
    ("fp8-bfloat16", 128, (4, 4), [1000, 0], 0, 0, 12),  # MHA, an empty context
    ("float16", 80, (6, 2), [77, 33], 0, 0, 16),         # half span and V tail tiles
    ("fp8-float16", 112, (8, 2), [140], 0, 0, 12),
    ("float16", 128, (32, 1), [300, 5, 129], 0, 16, 12),  # MQA: two CTAs of 16 heads each
    ("fp8-bfloat16", 64, (48, 2), [520, 0], 40, 16, 16),  # groups of 24: 16 + 8 rows
    ("bfloat16", 96, (17, 1), [260, 31], 0, 16, 16),     # a group of 17: 16 + 1 rows
    ("float16", 128, (33, 1), [200, 64], 0, 16, 12),     # 33 heads: 16 + 16 + 1 rows
    ("float16", 128, (49, 1), [200, 64], 0, 16, 4),      # above 48 heads: 4 warps stay
])
def test_wide_ctas_match_oracle_and_four_warps(emu: Any, kind: str, head_size: int,
                                               heads: tuple[int, int], ctx_lens: list[int],
                                               window: int, rows: int, warps: int) -> None:
    """An unsplit grid of at most wide_warps_max_ctas CTAs (the SM count on the GPU) runs CTAs
    of kWideWarps warps (4 x MmaMinBlocks: 16 up to head size 96, 12 up to 128) whose warps
    take the CTA's tiles in turn and merge in shared memory, for groups of at most 48 query
    heads (above 16 in CTAs of 16: ``rows``): output and log-sum-exp match the oracle (ALiBi
    included) and 4-warp CTAs, up to the merge order. Groups above 48 keep 4 warps."""
    case, scales, dtype = _pipeline_case(kind, head_size, ctx_lens, heads=heads,
                                         seed=70 + head_size, alibi=True)
    emu.set_layout(rows, 0, 0)
    _check_wide_against_four_warps(emu, case, scales, dtype, kind, warps, window)


def _check_wide_against_four_warps(emu: Any, case: dict[str, Any], scales: Any, dtype: Any,
                                   kind: str, warps: int, window: int = 0) -> None:
    """Runs ``case`` with wide CTAs allowed on every grid (``warps`` warps per main-kernel CTA)
    and with 4-warp CTAs: both match the oracle, and each other up to the merge order."""
    emu.set_wide_warps(ANY_GRID)
    _check_pipeline(emu, case, scales, dtype, f"{kind} wide CTAs", sliding_window=window)
    assert emu.main_warps() == warps
    assert last_launch(emu)[1] == 2
    wide = case["out"].clone()
    emu.set_wide_warps(0)
    case["out"].fill_(float("nan"))
    _check_pipeline(emu, case, scales, dtype, f"{kind} 4-warp CTAs", sliding_window=window)
    assert emu.main_warps() == 4
    assert_close(wide, case["out"], dtype, "wide vs 4-warp CTAs")


DEFAULT_WIDE_MAX_GROUP = 48  # kDefaultWideMaxGroup


@pytest.mark.parametrize(("kind", "head_size", "heads", "ctx_lens", "max_group", "warps"), [
    ("float16", 128, (64, 1), [300, 70], 64, 12),        # MQA-64: four CTAs of 16 heads
    ("fp8-bfloat16", 64, (66, 2), [200, 9, 0], 33, 16),  # groups of 33: 16 + 16 + 1 rows
    ("bfloat16", 96, (80, 1), [129], 80, 16),            # 5 x 16 rows
    ("float16", 128, (48, 1), [300, 70], 47, 4),         # one head above the limit: 4 warps
])
def test_wide_max_group_sets_the_largest_wide_group(emu: Any, kind: str, head_size: int,
                                                    heads: tuple[int, int],
                                                    ctx_lens: list[int], max_group: int,
                                                    warps: int) -> None:
    """Params::wide_max_group (CACHEFLOW_PA_WIDE_GROUP on the GPU) is the largest group that
    takes wide CTAs: groups above 32 run ceil(group / 16) wide CTAs of 16 heads per KV head when
    it allows them, matching the oracle and 4-warp CTAs up to the merge order; a group above it
    keeps 4 warps."""
    case, scales, dtype = _pipeline_case(kind, head_size, ctx_lens, heads=heads,
                                         seed=110 + head_size, alibi=True)
    emu.set_layout(16, 0, 0)
    emu.set_wide_max_group(max_group)
    try:
        _check_wide_against_four_warps(emu, case, scales, dtype, f"{kind} up to {max_group}",
                                       warps)
    finally:
        emu.set_wide_max_group(DEFAULT_WIDE_MAX_GROUP)


@pytest.mark.parametrize(("kind", "head_size", "heads", "ctx_lens", "rows", "warps"), [
    ("float16", 128, (32, 1), [300, 5, 129], 16, 6),     # MQA in two CTAs of 16 heads each
    ("bfloat16", 64, (32, 2), [400, 70], 0, 8),
    ("fp8-float16", 96, (12, 1), [257, 64], 0, 8),
    ("fp8-bfloat16", 128, (32, 1), [1000, 0], 16, 6),     # an empty context
    ("float16", 112, (24, 1), [140, 33], 16, 6),         # a group of 24: 16 + 8 rows
    ("float16", 128, (8, 1), [300, 64], 0, 4),           # tokens on M: 4 warps stay
    ("fp8-float16", 128, (4, 4), [200, 31], 0, 4),       # MHA (tokens on M) likewise
])
def test_half_wide_ctas_match_oracle_and_four_warps(emu: Any, kind: str, head_size: int,
                                                    heads: tuple[int, int], ctx_lens: list[int],
                                                    rows: int, warps: int) -> None:
    """An unsplit grid of more than wide_warps_max_ctas and at most half_wide_max_ctas CTAs (one
    to two per SM on the GPU) runs CTAs of half kWideWarps warps (6 up to head size 128, 8 up to
    96), groups of 9 to 32 query heads in CTAs of 16: output and log-sum-exp match the oracle
    and 4-warp CTAs, up to the merge order. Groups of at most 8 (tokens on the MMA's M
    dimension) keep 4 warps: half-wide CTAs were no faster there (H100, 2026-12-06)."""
    case, scales, dtype = _pipeline_case(kind, head_size, ctx_lens, heads=heads,
                                         seed=90 + head_size, alibi=True)
    emu.set_layout(rows, 0, 0)
    emu.set_half_wide(ANY_GRID)
    _check_pipeline(emu, case, scales, dtype, f"{kind} half-wide CTAs")
    assert emu.main_warps() == warps
    assert last_launch(emu)[1] == 2
    half = case["out"].clone()
    emu.set_half_wide(0)
    case["out"].fill_(float("nan"))
    _check_pipeline(emu, case, scales, dtype, f"{kind} 4-warp CTAs")
    assert emu.main_warps() == 4
    assert_close(half, case["out"], dtype, "half-wide vs 4-warp CTAs")


def test_wide_before_half_wide_and_split_grids_at_four_warps(emu: Any) -> None:
    """Grids within wide_warps_max_ctas take wide CTAs, larger ones within half_wide_max_ctas
    half-wide ones, larger still and split grids CTAs of 4 warps."""
    case, scales, dtype = _pipeline_case("float16", 128, [200, 90, 31], heads=(24, 2), seed=76)
    ctas = 2 * 3  # 2 KV heads x 3 sequences
    for wide, half, partition, warps in ((ctas, ANY_GRID, 0, 12), (ctas - 1, ctas, 0, 6),
                                         (1, ctas - 1, 0, 4), (0, ANY_GRID, 64, 4)):
        emu.set_wide_warps(wide)
        emu.set_half_wide(half)
        case["out"].fill_(float("nan"))
        _check_pipeline(emu, case, scales, dtype, f"limits {wide} / {half}",
                        partition_size=partition)
        assert emu.main_warps() == warps


def test_wide_ctas_only_for_small_unsplit_grids(emu: Any) -> None:
    """The grid's CTAs (KV heads x head groups x sequences) decide: at the limit wide CTAs, one
    CTA more than the limit CTAs of 4 warps; a split launch keeps CTAs of 4 warps."""
    case, scales, dtype = _pipeline_case("float16", 128, [200, 90, 31], heads=(8, 2), seed=71)
    ctas = 2 * 3  # 2 KV heads x 3 sequences
    for limit, partition, warps in ((ctas, 0, 12), (ctas - 1, 0, 4), (ANY_GRID, 64, 4)):
        emu.set_wide_warps(limit)
        case["out"].fill_(float("nan"))
        _check_pipeline(emu, case, scales, dtype, f"limit {limit}", partition_size=partition)
        assert emu.main_warps() == warps


def test_wide_ctas_need_pair_steps_and_deep_rings(emu: Any) -> None:
    """CTAs of 4 warps stay: with one-tile steps, a ring forced below four stages, 16-bit head
    size 256 (four stages of 8 warps do not fit an SM's shared memory; at 112, four of 12 do),
    and groups of more than 16 query heads in CTAs of 32; in CTAs of 16 such a group takes wide
    CTAs up to 32 heads, and 4-warp CTAs of 16 (wide_warps_max_ctas 0) are bit for bit the
    CTAs of 32."""
    emu.set_wide_warps(ANY_GRID)
    case, scales, dtype = _pipeline_case("float16", 128, [70], heads=(8, 2), seed=72)
    assert _without_pair_steps(emu, case, scales, dtype, emu.main_warps) == [4, 4]
    for head_size, warps in ((256, 4), (112, 12)):
        case, scales, dtype = _pipeline_case("bfloat16", head_size, [90], heads=(4, 2), seed=73)
        _check_pipeline(emu, case, scales, dtype, f"head size {head_size}")
        assert emu.main_warps() == warps
    case, scales, dtype = _pipeline_case("float16", 128, [90], heads=(32, 1), seed=74)
    _check_pipeline(emu, case, scales, dtype, "32-row CTAs")
    assert emu.last_rows() == 32 and emu.main_warps() == 4
    rows32 = case["out"].clone()
    emu.set_layout(16, 0, 0)
    _check_pipeline(emu, case, scales, dtype, "wide 16-row CTAs of a 32-head group")
    assert emu.last_rows() == 16 and emu.main_warps() == 12
    emu.set_wide_warps(0)
    case["out"].fill_(float("nan"))
    _check_pipeline(emu, case, scales, dtype, "4-warp 16-row CTAs of a 32-head group")
    assert emu.last_rows() == 16 and emu.main_warps() == 4
    assert torch.equal(case["out"], rows32)


def test_wide_ctas_fused_launch_matches_the_two_kernels(emu: Any) -> None:
    """A fused launch (rotary and the new token's store in the attention kernel) on a grid small
    enough for wide CTAs takes them too, so its output is bit for bit that of
    rotary_embedding_with_cache followed by a wide unfused launch, and its cache the same."""
    case = make_case([129, 8], num_heads=8, num_kv_heads=2, head_size=128, dtype=torch.float16,
                     seed=75, q_scale=2.0)
    gen = torch.Generator().manual_seed(8)
    key = (torch.randn(2, 2 * 128, generator=gen) * 3).to(torch.float16)
    value = (torch.randn(2, 2 * 128, generator=gen) * 3).to(torch.float16)
    positions = torch.tensor([128, 7], dtype=torch.int64)
    slots = new_token_slots(case)
    table = rotary_table(200, 128)
    emu.set_wide_warps(ANY_GRID)
    ref = _clone(case)
    ref["query"] = rotate_like_kernel(case["query"], table, positions, True)
    ref["key_cache"].view(-1, 2, 128)[slots] = rotate_like_kernel(key.reshape(2, 2, 128), table,
                                                                  positions, True)
    ref["value_cache"].view(-1, 2, 128)[slots] = value.reshape(2, 2, 128)
    assert run_emulated(emu, ref) == 1
    assert emu.main_warps() == 12
    fused = _clone(case)
    assert run_fused(emu, fused, key, value, positions, slots, table, True) == 1
    assert emu.main_warps() == 12
    assert torch.equal(fused["out"], ref["out"])
    for name in ("key_cache", "value_cache"):  # byte views: spare slots hold NaN
        assert torch.equal(fused[name].view(torch.uint8), ref[name].view(torch.uint8)), name


def _strided_query(case: dict[str, Any], extra_heads: int) -> int:
    """Replaces case['query'] by a view of the first heads of wider rows (a fused QKV output:
    ``extra_heads`` more heads of NaN per token) and returns its row stride in elements."""
    q = case["query"]
    num_seqs, num_heads, head_size = q.shape
    fused = torch.full((num_seqs, (num_heads + extra_heads) * head_size), float("nan"),
                       dtype=q.dtype)
    view = fused[:, : num_heads * head_size].view(num_seqs, num_heads, head_size)
    view.copy_(q)
    case["query"] = view
    assert not view.is_contiguous()
    return fused.stride(0)


@pytest.mark.parametrize(("kind", "head_size", "heads", "stages"), [
    ("float16", 128, (8, 2), -1),    # pipelined kernel
    ("bfloat16", 96, (32, 1), -1),   # 32-row CTAs
    ("float16", 64, (4, 4), 0),      # register kernel
    ("float32", 80, (6, 2), -1),     # CUDA-core kernel
])
def test_strided_query_rows(emu: Any, kind: str, head_size: int, heads: tuple[int, int],
                            stages: int) -> None:
    """A query whose sequences are rows of a wider fused QKV output (row stride > num_heads *
    head_size; the NaN in between must never be read) gives the oracle's result."""
    configure(emu, stages=stages, dtype=DTYPES[kind], head_size=head_size)
    case = make_case([90, 17, 1], num_heads=heads[0], num_kv_heads=heads[1], head_size=head_size,
                     dtype=getattr(torch, kind), seed=70 + head_size)
    stride = _strided_query(case, 2 * heads[1])
    emu.set_layout(DEFAULT_CTA_ROWS, stride, 0)
    check(emu, case, partition_size=64)


# ---- The decode calls of sanitizer_sweep.py (sweep_paged_attention) and the combine kernel's
# shared memory.


def test_combine_shared_memory_is_whole_chunks(emu: Any) -> None:
    """Two partitions: the combine kernel's 4 reduction floats + 2 weights were requested as 24
    bytes, and ptxas reads weights[0..2] of its tail loop with one LDS.128 (12 bytes used), so
    compute-sanitizer memcheck saw an out-of-bounds shared read (sanitizer_sweep.py's head-256
    call, 2026-12-03). The emulator requires requests of whole 16-byte chunks."""
    case = make_case([65, 3], num_heads=2, num_kv_heads=1, head_size=64, seed=80)
    assert check(emu, case, partition_size=64, max_context_len=65) == 2


H200_SMS = 132
# sweep_paged_attention's shapes: (ctx_lens, heads, kv_heads, head_size, block_size, partition);
# None is the automatic plan (of an H200), as the sweep's partition_size=None.
SANITIZER_SHAPES = [
    ([1, 17, 64], 4, 4, 64, 16, None),
    ([5, 300], 8, 2, 80, 8, None),
    ([33, 1100], 8, 1, 96, 32, 256),
    ([700, 1, 129], 16, 2, 128, 16, 64),
    ([250], 4, 4, 256, 16, 128),
    ([40, 90], 2, 1, 112, 8, 0),
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("index", range(len(SANITIZER_SHAPES)),
                         ids=[f"d{s[3]}-p{s[5]}" for s in SANITIZER_SHAPES])
def test_sanitizer_sweep_shapes(emu: Any, dtype: str, index: int) -> None:
    """The calls of sanitizer_sweep.py's sweep_paged_attention (its ALiBi and window pattern
    too), with the partition plan the op takes."""
    ctx, heads, kv, d, bs, part = SANITIZER_SHAPES[index]
    calls = list(DTYPES).index(dtype) * len(SANITIZER_SHAPES) + index
    case = make_case(ctx, num_heads=heads, num_kv_heads=kv, head_size=d, block_size=bs,
                     dtype=getattr(torch, dtype), seed=calls, alibi=calls % 3 == 0)
    window = 37 if calls % 4 == 1 else 0
    size, parts = plan_partitions(len(ctx), heads, kv, max(ctx), H200_SMS, part, head_size=d)
    assert check(emu, case, partition_size=size, max_context_len=max(ctx),
                 sliding_window=window) == parts


# ---- Fused launches: the new token rotated and stored by the attention kernel ("New token").


def rotary_table(max_position: int, head_size: int, base: float = 10000.0) -> Any:
    """float32 [max_position, head_size]: cos | sin of position * base^(-2i / head_size)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def rotate_like_kernel(x: Any, table: Any, positions: Any, neox: bool) -> Any:
    """x [n, heads, D] (16-bit) rotated at positions [n] with rotary_embedding's arithmetic: cos
    and sin rounded to x's dtype, each product rounded to it, then the sum; positions outside the
    table leave a row as it is."""
    dt = x.dtype
    n, _, d = x.shape
    inside = (positions >= 0) & (positions < table.shape[0])
    rows = table[positions.clamp(0, table.shape[0] - 1)].to(dt).float()
    c, s = rows[:, None, : d // 2], rows[:, None, d // 2:]
    xf = x.float()
    a, b = (xf[..., : d // 2], xf[..., d // 2:]) if neox else (xf[..., 0::2], xf[..., 1::2])

    def rnd(t: Any) -> Any:
        return t.to(dt).float()

    y1 = (rnd(a * c) - rnd(b * s)).to(dt)
    y2 = (rnd(b * c) + rnd(a * s)).to(dt)
    y = torch.cat([y1, y2], -1) if neox else torch.stack([y1, y2], -1).reshape(n, -1, d)
    return torch.where(inside[:, None, None], y, x)


def new_token_slots(case: dict[str, Any]) -> Any:
    """int64 [num_seqs]: the slot of each sequence's last context position (-1 if empty)."""
    bs = case["key_cache"].shape[1]
    slots = []
    for s, ctx in enumerate(case["ctx_lens"]):
        blk = int(case["block_tables"][s, (ctx - 1) // bs]) if ctx else 0
        slots.append(blk * bs + (ctx - 1) % bs if ctx else -1)
    return torch.tensor(slots, dtype=torch.int64)


def run_fused(emu: Any, case: dict[str, Any], key: Any, value: Any, positions: Any,
              slots: Any, table: Any, neox: bool, *, k_scale: float = 1.0,
              v_scale: float = 1.0, partition_size: int = 0, sliding_window: int = 0,
              logits_soft_cap: float = 0.0) -> int:
    """A fused launch on the case (its query taken as unrotated): the emulator's return code
    (partitions, or -2 when the dispatch declined and nothing ran)."""
    q, kc = case["query"], case["key_cache"]
    num_seqs, num_heads, head_size = q.shape
    num_blocks, block_size, num_kv_heads, _ = kc.shape
    max_blocks = case["block_tables"].shape[1]
    dtype = DTYPES[str(q.dtype).removeprefix("torch.")] + (4 if kc.dtype == torch.float8_e4m3fn
                                                           else 0)
    emu.set_new_token(_ptr(key), _ptr(value), key.stride(0), value.stride(0), _ptr(positions),
                      _ptr(slots), _ptr(table), 0 if table is None else table.shape[0],
                      1 if neox else 0)
    try:
        plan = (num_seqs, num_heads, head_size, num_kv_heads, num_blocks, block_size, max_blocks,
                case["scale"], max_blocks * block_size, partition_size, sliding_window)
        need = ctypes.c_int64(0)
        emu(dtype, None, None, None, None, None, None, None, None, 0, *plan, ctypes.byref(need),
            k_scale, v_scale, logits_soft_cap, None)
        ws = torch.full((max(need.value, 1),), float("nan"))
        return emu(dtype, _ptr(case["out"]), _ptr(q), _ptr(kc), _ptr(case["value_cache"]),
                   _ptr(case["block_tables"]), _ptr(case["context_lens"]),
                   _ptr(case["alibi_slopes"]), _ptr(ws), need.value, *plan, None, k_scale,
                   v_scale, logits_soft_cap, None)
    finally:
        emu.set_new_token(None, None, 0, 0, None, None, None, 0, 1)


def _clone(case: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


# (dtype, fp8 cache, head_size, block_size, (num_heads, num_kv_heads), ctx_lens, neox, alibi)
FUSED_SWEEP = [
    ("float16", False, 128, 16, (4, 4), [1, 17, 40], True, False),
    ("bfloat16", False, 64, 8, (8, 2), [33, 9, 70], False, True),
    ("float16", False, 80, 32, (6, 1), [65, 3], True, False),
    ("bfloat16", False, 112, 16, (8, 1), [100, 31], False, False),
    ("float16", False, 96, 16, (32, 1), [129, 8], True, False),
    ("float16", False, 256, 16, (4, 2), [45, 90], True, False),
    ("float16", True, 128, 16, (8, 2), [1, 64, 77], True, False),
    ("bfloat16", True, 64, 32, (16, 2), [200, 2], False, False),
]


@pytest.mark.parametrize(
    ("dtype", "fp8", "head_size", "block_size", "heads", "ctx_lens", "neox", "alibi"),
    FUSED_SWEEP,
    ids=[f"{c[0]}{'-fp8' if c[1] else ''}-d{c[2]}-bs{c[3]}-h{c[4][0]}kv{c[4][1]}-"
         f"{'neox' if c[6] else 'gptj'}" for c in FUSED_SWEEP],
)
def test_fused_new_token_matches_rotary_cache_then_attention(
    emu: Any, dtype: str, fp8: bool, head_size: int, block_size: int, heads: tuple[int, int],
    ctx_lens: list[int], neox: bool, alibi: bool,
) -> None:
    """A fused launch equals rotary_embedding_with_cache followed by a plain launch, bit for bit:
    the same output, and the same cache bytes (the new token's rotated key and its value at its
    slot, every other slot untouched)."""
    torch_dtype = getattr(torch, dtype)
    num_heads, num_kv_heads = heads
    case = make_case(ctx_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_size=head_size, block_size=block_size, dtype=torch_dtype,
                     alibi=alibi, seed=head_size + block_size + num_heads, q_scale=2.0)
    k_scale, v_scale = (0.5, 1.5) if fp8 else (1.0, 1.0)
    if fp8:
        case["key_cache"] = quantize_fp8(case["key_cache"], k_scale)
        case["value_cache"] = quantize_fp8(case["value_cache"], v_scale)
    gen = torch.Generator().manual_seed(7)
    num_seqs = len(ctx_lens)
    row = num_kv_heads * head_size
    # The step's key and value as views of a wider projection output (strided rows).
    kv = (torch.randn(num_seqs, 2 * row + 16, generator=gen) * 3).to(torch_dtype)
    key, value = kv[:, :row], kv[:, row + 16:]
    positions = torch.tensor([c - 1 + 5 * s for s, c in enumerate(ctx_lens)], dtype=torch.int64)
    table = rotary_table(int(positions.max()) + 3, head_size)
    slots = new_token_slots(case)

    ref = _clone(case)
    ref["query"] = rotate_like_kernel(case["query"], table, positions, neox)
    k_rot = rotate_like_kernel(key.reshape(num_seqs, num_kv_heads, head_size), table, positions,
                               neox)
    v_rows = value.reshape(num_seqs, num_kv_heads, head_size)
    if fp8:
        k_rot, v_rows = quantize_fp8(k_rot, k_scale), quantize_fp8(v_rows, v_scale)
    ref["key_cache"].view(-1, num_kv_heads, head_size)[slots] = k_rot
    ref["value_cache"].view(-1, num_kv_heads, head_size)[slots] = v_rows
    assert run_emulated(emu, ref, k_scale=k_scale, v_scale=v_scale) == 1

    fused = _clone(case)
    assert run_fused(emu, fused, key, value, positions, slots, table, neox, k_scale=k_scale,
                     v_scale=v_scale) == 1
    assert torch.equal(fused["out"], ref["out"])
    for name in ("key_cache", "value_cache"):
        assert torch.equal(fused[name].view(torch.uint8), ref[name].view(torch.uint8)), name


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_new_token_with_copies_landing_at_issue(emu: Any, fp8: bool) -> None:
    """With cp.async copies landing at issue, a copy of the new slot issued before the kernel
    stored it would read the old bytes: the fused launch still equals the two-step path (every
    context ends in the last tile of some warp, at every offset within a tile)."""
    configure(emu, mode=EARLY)
    test_fused_new_token_matches_rotary_cache_then_attention(
        emu, "float16", fp8, 128, 16, (8, 2), list(range(57, 73)), True, False)


@pytest.mark.parametrize(("window", "cap"), [(24, 0.0), (0, 30.0), (50, 20.0)])
def test_fused_new_token_with_window_and_soft_cap(emu: Any, window: int, cap: float) -> None:
    """Sliding window and logits soft cap (Mistral, Gemma 2) pass through the fused launch."""
    case = make_case([70, 9, 130], num_heads=8, num_kv_heads=4, head_size=128, block_size=16,
                     dtype=torch.bfloat16, seed=21, q_scale=3.0)
    gen = torch.Generator().manual_seed(9)
    key = torch.randn(3, 512, generator=gen).to(torch.bfloat16)
    value = torch.randn(3, 512, generator=gen).to(torch.bfloat16)
    positions = torch.tensor([69, 8, 129], dtype=torch.int64)
    table = rotary_table(160, 128)
    slots = new_token_slots(case)
    ref = _clone(case)
    ref["query"] = rotate_like_kernel(case["query"], table, positions, True)
    ref["key_cache"].view(-1, 4, 128)[slots] = rotate_like_kernel(key.view(3, 4, 128), table,
                                                                   positions, True)
    ref["value_cache"].view(-1, 4, 128)[slots] = value.view(3, 4, 128)
    run_emulated(emu, ref, sliding_window=window, logits_soft_cap=cap)
    fused = _clone(case)
    assert run_fused(emu, fused, key, value, positions, slots, table, True,
                     sliding_window=window, logits_soft_cap=cap) == 1
    assert torch.equal(fused["out"], ref["out"])


@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("mode", [LATE, EARLY])
@pytest.mark.parametrize(("heads", "fp8"), [((8, 2), False), ((32, 1), True)])
def test_fused_new_token_split_launch(emu: Any, mode: int, reverse: int,
                                      heads: tuple[int, int], fp8: bool) -> None:
    """Split launches (64-token partitions, the new position first, inside and last in one):
    the partition holding the new position stores it (with the CTAs run in either order, a
    store by another partition's CTA would be missed by one of them); equal to the two-step
    path with the same split, bit for bit, output and caches."""
    configure(emu, mode=mode)
    emu.set_cta_order(reverse)
    num_heads, num_kv_heads = heads
    lens = [65, 128, 100, 1, 300]
    case = make_case(lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=64,
                     block_size=16, seed=31, q_scale=2.0)
    k_scale, v_scale = (0.5, 1.5) if fp8 else (1.0, 1.0)
    if fp8:
        case["key_cache"] = quantize_fp8(case["key_cache"], k_scale)
        case["value_cache"] = quantize_fp8(case["value_cache"], v_scale)
    n, row = len(lens), num_kv_heads * 64
    gen = torch.Generator().manual_seed(4)
    key = torch.randn(n, row, generator=gen).half()
    value = torch.randn(n, row, generator=gen).half()
    positions = torch.tensor([c - 1 for c in lens], dtype=torch.int64)
    table = rotary_table(320, 64)
    slots = new_token_slots(case)
    ref = _clone(case)
    ref["query"] = rotate_like_kernel(case["query"], table, positions, True)
    k_rot = rotate_like_kernel(key.view(n, num_kv_heads, 64), table, positions, True)
    v_rows = value.view(n, num_kv_heads, 64)
    if fp8:
        k_rot, v_rows = quantize_fp8(k_rot, k_scale), quantize_fp8(v_rows, v_scale)
    ref["key_cache"].view(-1, num_kv_heads, 64)[slots] = k_rot
    ref["value_cache"].view(-1, num_kv_heads, 64)[slots] = v_rows
    parts = run_emulated(emu, ref, partition_size=64, k_scale=k_scale, v_scale=v_scale)
    assert parts > 1
    fused = _clone(case)
    assert run_fused(emu, fused, key, value, positions, slots, table, True, k_scale=k_scale,
                     v_scale=v_scale, partition_size=64) == parts
    assert torch.equal(fused["out"], ref["out"])
    for name in ("key_cache", "value_cache"):
        assert torch.equal(fused[name].view(torch.uint8), ref[name].view(torch.uint8)), name


def test_fused_new_token_edge_rows(emu: Any) -> None:
    """A negative slot stores nothing (its sequence still attends over the cache as it is); a
    position past the table leaves that token's query and key unrotated; without a table
    nothing rotates; an empty context stores its token and gives zeros."""
    case = make_case([40, 0, 23, 9], num_heads=8, num_kv_heads=2, head_size=64, block_size=8,
                     seed=11, q_scale=2.0, spare_blocks=3)
    num_seqs, row = 4, 2 * 64
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(num_seqs, row, generator=gen).half()
    value = torch.randn(num_seqs, row, generator=gen).half()
    table = rotary_table(64, 64)
    positions = torch.tensor([39, 5, 500, 8], dtype=torch.int64)  # 500: past the table
    slots = new_token_slots(case)
    slots[1] = int(case["block_tables"][1, 0]) * 8  # an empty context with a slot
    slots[3] = -1  # a padded row: nothing stored
    for tab in (table, None):
        ref = _clone(case)
        rot_q = case["query"] if tab is None else rotate_like_kernel(case["query"], tab,
                                                                   positions, True)
        ref["query"] = rot_q
        k_rot = key.view(num_seqs, 2, 64)
        if tab is not None:
            k_rot = rotate_like_kernel(k_rot, tab, positions, True)
        stored = slots >= 0
        ref["key_cache"].view(-1, 2, 64)[slots[stored]] = k_rot[stored]
        ref["value_cache"].view(-1, 2, 64)[slots[stored]] = value.view(num_seqs, 2, 64)[stored]
        run_emulated(emu, ref)
        fused = _clone(case)
        assert run_fused(emu, fused, key, value, positions, slots, tab, True) == 1
        assert torch.equal(fused["out"], ref["out"])
        assert (fused["out"][1] == 0).all()
        for name in ("key_cache", "value_cache"):
            assert torch.equal(fused[name].view(torch.uint8), ref[name].view(torch.uint8)), name


@pytest.mark.parametrize("why", ["head_groups", "register_kernel", "float32"])
def test_fused_new_token_declined(emu: Any, why: str) -> None:
    """Launches without one pipelined CTA per (sequence, KV head, partition) decline (-2) and
    touch nothing: the caller then runs the rotary + cache kernel and a plain launch."""
    heads, d, dtype = (8, 2), 64, torch.float16
    if why == "head_groups":
        heads, d = (64, 1), 128  # 64 query heads per KV head: two CTAs of 32
    if why == "float32":
        dtype = torch.float32
    if why == "register_kernel":
        configure(emu, stages=0)
    case = make_case([300, 20], num_heads=heads[0], num_kv_heads=heads[1], head_size=d,
                     dtype=dtype, seed=1)
    before = _clone(case)
    key = torch.randn(2, heads[1] * d).to(dtype)
    value = torch.randn(2, heads[1] * d).to(dtype)
    positions = torch.tensor([299, 19], dtype=torch.int64)
    code = run_fused(emu, case, key, value, positions, new_token_slots(case),
                     rotary_table(512, d), True)
    assert code == -2
    for name in ("out", "key_cache", "value_cache"):
        assert torch.equal(case[name].view(torch.uint8), before[name].view(torch.uint8))
