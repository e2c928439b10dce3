"""The emulated decode tests of the pipelined kernel again, with the kernels built with the build
options that are off by default until measured on a GPU (paged_attention.cuh):

- CACHEFLOW_PA_LDSM_V=1: the two-tile step's 16-bit V fragments through ldmatrix.x4.trans, the
  accumulators in natural d-tile order and the V layout costed for ldmatrix (kPipeLdsmV);
- CACHEFLOW_PA_FP8_F16_MMA=1: bfloat16 launches over FP8 caches run float16 MMAs, with the query
  staged in float16 scaled by a power of two (MmaElem).

The tests are those of test_kernels_paged_attention_emulated.py that run the pipelined kernel on
16-bit and FP8 caches (head sizes 64 to 256, CTAs of 16 and 32 rows, wide CTAs, split launches
and their merge, fused launches, soft cap); imported here, they take this module's ``emu``.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_kernels_paged_attention_emulated as emulated
from test_kernels_paged_attention_emulated import (  # noqa: F401 (collected with this emu)
    _default_pipeline,
    test_fp8_cache_matches_oracle,
    test_fused_new_token_matches_rotary_cache_then_attention,
    test_fused_new_token_split_launch,
    test_fused_new_token_with_copies_landing_at_issue,
    test_fused_new_token_with_window_and_soft_cap,
    test_log_sum_exp_output,
    test_matches_oracle,
    test_merge_of_many_partitions_matches_unsplit,
    test_one_tile_steps_match_oracle,
    test_output_rows_not_aligned_for_vector_stores,
    test_pipeline_matches_oracle,
    test_pipeline_soft_cap_and_empty_contexts,
    test_sanitizer_sweep_shapes,
    test_strided_query_rows,
    test_two_row_tiles_match_oracle_and_sixteen_rows,
    test_wide_ctas_fused_launch_matches_the_two_kernels,
    test_wide_ctas_match_oracle_and_four_warps,
)


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The kernels as a build with both options compiles them."""
    return emulated.build_emulator(tmp_path_factory, "-DCACHEFLOW_PA_LDSM_V=1",
                                   "-DCACHEFLOW_PA_FP8_F16_MMA=1")


def test_build_has_the_options(emu: Any) -> None:
    """The options reached the kernels (else this module would test the defaults twice)."""
    assert (emu.ldsm_v(), emu.fp8_f16_mma()) == (1, 1)
