"""The emulated decode tests of the pipelined kernel again, with the kernels built with other
values of the build options than the defaults (paged_attention.cuh):

- CACHEFLOW_PA_LDSM_V=1 (off by default): the two-tile step's 16-bit V fragments through
  ldmatrix.x4.trans, the accumulators in natural d-tile order and the V layout costed for
  ldmatrix (kPipeLdsmV);
- CACHEFLOW_PA_FP8_F16_MMA (on by default; =0: bfloat16 MMAs): bfloat16 launches over FP8 caches
  run float16 MMAs, with the query staged in float16 scaled by a power of two (MmaElem);
- CACHEFLOW_PA_TOKENS_M (on by default; =0: heads on M for every group): the two-tile step of KV
  heads with at most 8 query heads computes S^T = K Q^T and O^T = V^T P^T, the step's 16 tokens
  on the MMA's M dimension (PipePairLoopTokensM).

Each test runs against three builds (``BUILDS``): the last two options off (the layout every
group had before them), that with LDSM_V on, and all three on. The tests are those of
test_kernels_paged_attention_emulated.py that run the pipelined kernel on 16-bit and FP8 caches
(head sizes 64 to 256, CTAs of 16 and 32 rows, wide CTAs, split launches and their merge, fused
launches, soft cap, sliding window, lazy rescaling); imported here, they take this module's
``emu``. The tests below them cover the transposed step: its dispatch (groups of at most 8 query
heads with two-tile steps, nothing else) and a sweep of its launches against the float64 oracle.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
import test_kernels_paged_attention_emulated as emulated
from test_kernels_paged_attention_emulated import (  # noqa: F401 (collected with this emu)
    ANY_GRID,
    EARLY,
    LATE,
    _default_pipeline,
    _pipeline_case,
    configure,
    last_launch,
    set_step,
    test_empty_contexts_give_zeros,
    test_fp8_cache_matches_oracle,
    test_fused_new_token_matches_rotary_cache_then_attention,
    test_fused_new_token_split_launch,
    test_fused_new_token_with_copies_landing_at_issue,
    test_fused_new_token_with_window_and_soft_cap,
    test_lazy_rescale_thresholds,
    test_log_sum_exp_output,
    test_matches_oracle,
    test_merge_of_many_partitions_matches_unsplit,
    test_one_tile_steps_match_oracle,
    test_output_rows_not_aligned_for_vector_stores,
    test_pipeline_matches_oracle,
    test_pipeline_soft_cap_and_empty_contexts,
    test_pipeline_window_many_partitions,
    test_sanitizer_sweep_shapes,
    test_sliding_window,
    test_strided_query_rows,
    test_two_row_tiles_match_oracle_and_sixteen_rows,
    test_wide_ctas_fused_launch_matches_the_two_kernels,
    test_wide_ctas_match_oracle_and_four_warps,
)

from paged_attention_testutil import assert_close, dequantize_fp8, oracle, oracle_lse

torch = pytest.importorskip("torch")

# Build name -> the -D options (as the CMake build options set them).
BUILDS = {
    "heads_on_m": ("-DCACHEFLOW_PA_FP8_F16_MMA=0", "-DCACHEFLOW_PA_TOKENS_M=0"),
    "ldsm_heads_on_m": ("-DCACHEFLOW_PA_LDSM_V=1", "-DCACHEFLOW_PA_TOKENS_M=0"),
    "all": ("-DCACHEFLOW_PA_LDSM_V=1", "-DCACHEFLOW_PA_FP8_F16_MMA=1",
            "-DCACHEFLOW_PA_TOKENS_M=1"),
}
DEFAULTS = {"CACHEFLOW_PA_LDSM_V": 0, "CACHEFLOW_PA_FP8_F16_MMA": 1, "CACHEFLOW_PA_TOKENS_M": 1}
TOKENS_M_BUILDS = ["all"]  # the default build runs the transposed step in every test of
# test_kernels_paged_attention_emulated.py; the sweep below also checks it is the path taken
# Started as collection ends (conftest.py); each compiled once per session.
EMULATOR_BUILDS = [(*emulated.PA_SOURCE, *defines) for defines in BUILDS.values()]


@pytest.fixture(scope="module", params=list(BUILDS))
def emu(request: pytest.FixtureRequest) -> Any:
    """The kernels as a build with the options of BUILDS[param] compiles them."""
    fn = emulated.build_emulator(*BUILDS[request.param])
    fn.build_name = request.param
    return fn


def test_build_has_the_options(emu: Any) -> None:
    """The options reached the kernels (else this module would test the defaults again)."""
    flags = BUILDS[emu.build_name]
    expected = tuple(1 if f"-D{name}=1" in flags else 0 if f"-D{name}=0" in flags else default
                     for name, default in DEFAULTS.items())
    assert (emu.ldsm_v(), emu.fp8_f16_mma(), emu.tokens_m()) == expected


def test_movmatrix_transposes_per_the_ptx_isa(emu: Any) -> None:
    """The emulated movmatrix.sync.aligned.m8n8.trans.b16: lane l's source holds elements
    (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of an 8x8 matrix of 16-bit values (the lower
    column in the low half); its result holds the same positions of the transpose."""
    m = [[(r << 8) | (c + 1) for c in range(8)] for r in range(8)]  # 64 distinct values
    src = (ctypes.c_uint32 * 32)()
    dst = (ctypes.c_uint32 * 32)()
    for lane in range(32):
        r, c = lane // 4, 2 * (lane % 4)
        src[lane] = m[r][c] | (m[r][c + 1] << 16)
    emu.movmatrix(ctypes.addressof(src), ctypes.addressof(dst))
    for lane in range(32):
        r, c = lane // 4, 2 * (lane % 4)
        assert dst[lane] == m[c][r] | (m[c + 1][r] << 16), lane


# ---- Tokens on the MMA's M dimension (CACHEFLOW_PA_TOKENS_M).

tokens_m_builds = pytest.mark.parametrize("emu", TOKENS_M_BUILDS, indirect=True)


def _check_tokens_m(emu: Any, case: dict[str, Any], scales: dict[str, float], dtype: str,
                    what: str, *, window: int = 0, cap: float = 0.0, partition: int = 0) -> int:
    """Runs the case (soft cap and window included), checks output and log-sum-exp against the
    float64 oracle; returns the partitions."""
    lse = torch.full(case["query"].shape[:2], float("nan"))
    parts = emulated.run_emulated(emu, case, sliding_window=window, logits_soft_cap=cap,
                                  lse=lse, partition_size=partition, **scales)
    kc, vc = case["key_cache"], case["value_cache"]
    if scales:
        kc = dequantize_fp8(kc, scales["k_scale"])
        vc = dequantize_fp8(vc, scales["v_scale"])
    common = (case["block_tables"], case["context_lens"], case["scale"], case["alibi_slopes"],
              window or None, cap or None)
    assert_close(case["out"], oracle(case["query"], kc, vc, *common), dtype, what)
    ref_lse = oracle_lse(case["query"], kc, *common)
    nonempty = torch.tensor([n > 0 for n in case["ctx_lens"]])
    torch.testing.assert_close(lse[nonempty].double(), ref_lse[nonempty], rtol=1e-4, atol=2e-3)
    assert torch.isneginf(lse[~nonempty]).all()
    return parts


# (kind, head_size, (num_heads, num_kv_heads), ctx_lens, partition, stages, alibi, window, cap):
# GQA-8, GQA-4, MHA and groups of 3 and 6; every head size (the half span at 80 and 112, the
# V tail at 80, 96 and 112); 16-bit head size 256 needs a forced depth of 4 for two-tile steps;
# contexts ending on and next to partition (64) and tile boundaries, of one token and empty.
TOKENS_M_CASES = [
    ("float16", 64, (16, 2), [1, 64, 65, 200], 64, -1, True, 0, 0.0),
    ("bfloat16", 80, (6, 1), [129, 7, 40], 0, -1, False, 40, 0.0),
    ("float16", 96, (8, 8), [128, 9, 0, 77], 64, -1, False, 0, 5.0),
    ("bfloat16", 112, (8, 2), [300, 16], 0, -1, True, 0, 0.0),
    ("float16", 128, (8, 1), [300, 63, 1], 64, -1, False, 100, 0.0),
    ("bfloat16", 128, (32, 4), [150, 33], 0, -1, False, 0, 4.0),
    ("float16", 128, (12, 4), [97, 250], 128, -1, True, 0, 0.0),
    ("float16", 256, (8, 1), [90, 41], 0, 4, False, 0, 0.0),
    ("bfloat16", 256, (4, 4), [130, 8], 64, 4, True, 30, 0.0),
    ("fp8-float16", 128, (8, 1), [257, 64, 1], 64, -1, True, 0, 0.0),
    ("fp8-bfloat16", 128, (16, 2), [300, 31], 0, -1, False, 0, 5.0),
    ("fp8-float16", 64, (4, 4), [200, 129, 0], 64, -1, False, 50, 0.0),
    ("fp8-bfloat16", 96, (4, 1), [129, 65], 64, -1, True, 0, 0.0),
    ("fp8-float16", 80, (8, 1), [100, 17], 0, -1, False, 0, 0.0),
    ("fp8-bfloat16", 112, (8, 2), [77, 140], 64, -1, False, 33, 0.0),
    ("fp8-bfloat16", 256, (8, 1), [150, 24], 64, -1, True, 0, 0.0),
    ("fp8-float16", 256, (2, 2), [70], 0, -1, False, 0, 3.0),
]


@tokens_m_builds
@pytest.mark.parametrize("mode", [LATE, EARLY], ids=["late", "early"])
@pytest.mark.parametrize(
    ("kind", "head_size", "heads", "ctx_lens", "partition", "stages", "alibi", "window", "cap"),
    TOKENS_M_CASES,
    ids=[f"{c[0]}-d{c[1]}-h{c[2][0]}kv{c[2][1]}-p{c[4]}" for c in TOKENS_M_CASES],
)
def test_tokens_m_matches_oracle(emu: Any, mode: int, kind: str, head_size: int,
                                 heads: tuple[int, int], ctx_lens: list[int], partition: int,
                                 stages: int, alibi: bool, window: int, cap: float) -> None:
    """Groups of at most 8 query heads run the transposed two-tile step (the launch record says
    so: a silent fallback to the default layout fails here); output and log-sum-exp match the
    oracle with ALiBi, soft cap, sliding window, split and unsplit launches, cp.async copies
    landing late or at issue."""
    configure(emu, mode=mode, stages=stages, dtype=emulated.DTYPE_CODES[kind],
              head_size=head_size)
    case, scales, dtype = _pipeline_case(kind, head_size, ctx_lens, heads=heads,
                                         seed=head_size + heads[0], alibi=alibi)
    _check_tokens_m(emu, case, scales, dtype, f"{kind} d{head_size} tokens on M", window=window,
                    cap=cap, partition=partition)
    assert last_launch(emu)[1] == 2
    assert emu.main_tokens_m() == 1


@tokens_m_builds
@pytest.mark.parametrize(("kind", "head_size", "heads", "warps"), [
    ("float16", 64, (8, 1), 16), ("bfloat16", 128, (8, 2), 12), ("fp8-bfloat16", 96, (4, 4), 16),
    ("fp8-float16", 256, (8, 1), 8),
])
def test_tokens_m_wide_ctas(emu: Any, kind: str, head_size: int, heads: tuple[int, int],
                            warps: int) -> None:
    """Wide CTAs (unsplit grids of at most one CTA per SM) take the transposed step too, and
    match the oracle and CTAs of 4 warps."""
    case, scales, dtype = _pipeline_case(kind, head_size, [400, 70, 1], heads=heads, seed=81,
                                         alibi=True)
    emu.set_wide_warps(ANY_GRID)
    _check_tokens_m(emu, case, scales, dtype, f"{kind} wide CTAs")
    assert (emu.main_warps(), emu.main_tokens_m()) == (warps, 1)
    wide = case["out"].clone()
    emu.set_wide_warps(0)
    case["out"].fill_(float("nan"))
    _check_tokens_m(emu, case, scales, dtype, f"{kind} 4-warp CTAs")
    assert (emu.main_warps(), emu.main_tokens_m()) == (4, 1)
    assert_close(wide, case["out"], dtype, "wide vs 4-warp CTAs")


@tokens_m_builds
def test_tokens_m_dispatch(emu: Any) -> None:
    """Only two-tile steps of groups of at most 8 query heads take the transposed step: groups
    of 9-16 (CTAs of 16) and of 17-32 (CTAs of 32 or 16) keep the default layout, as do
    one-tile steps, rings too shallow for two-tile steps and the register kernel."""
    for heads, expected in (((8, 1), 1), ((2, 2), 1), ((9, 1), 0), ((16, 1), 0), ((32, 1), 0)):
        case, scales, dtype = _pipeline_case("float16", 128, [90, 17], heads=heads, seed=82)
        _check_tokens_m(emu, case, scales, dtype, f"heads {heads}")
        assert emu.main_tokens_m() == expected, heads
    emu.set_layout(16, 0, 0)
    case, scales, dtype = _pipeline_case("fp8-bfloat16", 64, [90], heads=(24, 1), seed=83)
    _check_tokens_m(emu, case, scales, dtype, "24 heads in CTAs of 16")
    assert (emu.last_rows(), emu.main_tokens_m()) == (16, 0)
    emu.set_layout(0, 0, 0)
    case, scales, dtype = _pipeline_case("bfloat16", 96, [90, 40], heads=(8, 2), seed=84)
    set_step(emu, 1)
    _check_tokens_m(emu, case, scales, dtype, "one-tile steps")
    assert (last_launch(emu)[1], emu.main_tokens_m()) == (1, 0)
    set_step(emu)
    for stages, expected in ((3, 0), (0, 0), (4, 1)):
        configure(emu, stages=stages)
        _check_tokens_m(emu, case, scales, dtype, f"stages {stages}")
        assert emu.main_tokens_m() == expected, stages
