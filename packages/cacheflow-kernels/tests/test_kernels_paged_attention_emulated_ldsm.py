"""The emulated decode tests of the 16-bit two-tile step again, with the kernels built as
CACHEFLOW_PA_LDSM_V=1 builds them: V fragments through ldmatrix.x4.trans, the accumulators in
natural d-tile order and the V layout costed for ldmatrix (paged_attention.cuh, kPipeLdsmV).

The tests are those of test_kernels_paged_attention_emulated.py that run the two-tile step on a
16-bit cache (head sizes 64 to 256, CTAs of 16 and 32 rows, wide CTAs, split launches and their
merge, fused launches); imported here, they take this module's ``emu``.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_kernels_paged_attention_emulated as emulated
from test_kernels_paged_attention_emulated import (  # noqa: F401 (collected with this emu)
    _default_pipeline,
    test_fused_new_token_matches_rotary_cache_then_attention,
    test_fused_new_token_split_launch,
    test_log_sum_exp_output,
    test_matches_oracle,
    test_merge_of_many_partitions_matches_unsplit,
    test_output_rows_not_aligned_for_vector_stores,
    test_pipeline_matches_oracle,
    test_sanitizer_sweep_shapes,
    test_strided_query_rows,
    test_two_row_tiles_match_oracle_and_sixteen_rows,
    test_wide_ctas_fused_launch_matches_the_two_kernels,
    test_wide_ctas_match_oracle_and_four_warps,
)


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The kernels as a build with CACHEFLOW_PA_LDSM_V=1 compiles them."""
    return emulated.build_emulator(tmp_path_factory, "-DCACHEFLOW_PA_LDSM_V=1")


def test_build_reads_v_with_ldmatrix(emu: Any) -> None:
    """The option reached the kernels (else this module would test the default path twice)."""
    assert emu.ldsm_v() == 1
