"""``bench_split_plan.py --grid shapes``: the shapes named on the command line become cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_paged_attention  # noqa: E402
import bench_split_plan  # noqa: E402


def test_shapes_become_cases_with_their_heads_and_context(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_paged_attention, "CASES", list(bench_paged_attention.CASES))
    names = bench_split_plan.add_cases("shapes", "mqa:32:1:128:64:2048, gqa8:32:4:64:3:6144")
    assert names == ["plan_mqa_b64_ctx2048", "plan_gqa8_b3_ctx6144"]
    by_name = {c.name: c for c in bench_paged_attention.CASES}
    mqa, gqa = by_name[names[0]], by_name[names[1]]
    assert (mqa.batch, mqa.ctx, mqa.num_heads, mqa.num_kv_heads, mqa.head_size) == (
        64, 2048, 32, 1, 128)
    assert (gqa.batch, gqa.ctx, gqa.num_heads, gqa.num_kv_heads, gqa.head_size) == (
        3, 6144, 32, 4, 64)


@pytest.mark.parametrize("entry", ["mqa:32:1:128:64", "mqa:32:0:128:64:2048",
                                   "mqa:30:4:128:1:512", ":32:1:128:1:512", "mqa:a:1:128:1:512"])
def test_malformed_shape_is_named(entry: str) -> None:
    with pytest.raises(ValueError, match=entry.replace(":", ".")):
        bench_split_plan.parse_shapes(f"mha:32:32:128:1:1024,{entry}")


def test_cli_refuses_shapes_without_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_split_plan.main(["--out", "/dev/null", "--shapes", "mqa:32:1:128:64:2048"])
    assert exit_info.value.code == 2
    assert "--shapes goes with --grid shapes" in capsys.readouterr().err
