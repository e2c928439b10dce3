"""The communicator on CPU (gloo) over two spawned ranks, and libnccl discovery."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_testutil import run_on_ranks

from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.distributed import NcclLibrary
from cacheflow_runtime.distributed.nccl_library import ENV_NCCL_PATH, _decode_version

WORLD = 2


def _rank_tensor(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(shape, generator=gen) * 10).to(dtype)


def _collectives(rank: int) -> dict[str, torch.Tensor]:
    comm = ps.get_communicator()
    assert comm is not None and comm.rank == rank and comm.world_size == WORLD
    out: dict[str, torch.Tensor] = {}
    for dtype in (torch.float32, torch.float64, torch.int64):
        x = _rank_tensor(rank, (7, 5), dtype)
        returned = comm.all_reduce(x)
        assert returned is x  # in place
        out[f"all_reduce_{dtype}"] = x
    # non-contiguous input: reduced in place through a contiguous copy
    base = _rank_tensor(rank, (5, 7), torch.float32)
    view = base.t()
    comm.all_reduce(view)
    out["all_reduce_noncontig"] = base
    x = _rank_tensor(rank, (3, 5), torch.float32)
    out["all_gather_0"] = comm.all_gather(x, 0)
    out["all_gather_-1"] = comm.all_gather(x, -1)
    y = _rank_tensor(rank, (4, 6), torch.float32)
    out["reduce_scatter_0"] = comm.reduce_scatter(y, 0)
    out["reduce_scatter_1"] = comm.reduce_scatter(y, 1)
    z = _rank_tensor(rank, (9,), torch.float32)
    out["broadcast_1"] = comm.broadcast(z, src=1)
    # the layers' entry points go through the same communicator
    out["ps_all_reduce"] = ps.all_reduce(_rank_tensor(rank, (3,), torch.float32))
    out["ps_all_gather"] = ps.all_gather(_rank_tensor(rank, (2, 3), torch.float32), dim=-1)
    out["backend"] = torch.tensor([len(comm.backend)])
    try:
        comm.reduce_scatter(_rank_tensor(rank, (3,), torch.float32), 0)
    except ValueError as exc:
        assert "does not split into 2" in str(exc)
    else:
        raise AssertionError("reduce_scatter of 3 rows over 2 ranks did not fail")
    return out


def test_gloo_collectives_match_local_math() -> None:
    results = run_on_ranks(_collectives, WORLD)
    for dtype in (torch.float32, torch.float64, torch.int64):
        expected = sum(_rank_tensor(r, (7, 5), dtype) for r in range(WORLD))
        for r in range(WORLD):
            assert torch.equal(results[r][f"all_reduce_{dtype}"], expected), (r, dtype)
    expected = sum(_rank_tensor(r, (5, 7), torch.float32) for r in range(WORLD))
    parts = [_rank_tensor(r, (3, 5), torch.float32) for r in range(WORLD)]
    full = sum(_rank_tensor(r, (4, 6), torch.float32) for r in range(WORLD))
    for r in range(WORLD):
        got = results[r]
        assert torch.equal(got["all_reduce_noncontig"], expected)
        assert torch.equal(got["all_gather_0"], torch.cat(parts, 0))
        assert torch.equal(got["all_gather_-1"], torch.cat(parts, -1))
        assert torch.equal(got["reduce_scatter_0"], full[2 * r:2 * r + 2])
        assert torch.equal(got["reduce_scatter_1"], full[:, 3 * r:3 * r + 3])
        assert torch.equal(got["broadcast_1"], _rank_tensor(1, (9,), torch.float32))
        assert torch.equal(got["ps_all_reduce"],
                           sum(_rank_tensor(q, (3,), torch.float32) for q in range(WORLD)))
        assert torch.equal(got["ps_all_gather"],
                           torch.cat([_rank_tensor(q, (2, 3), torch.float32)
                                      for q in range(WORLD)], -1))
        assert got["backend"].item() == len("gloo (torch.distributed)")


def test_collective_without_communicator_fails_clearly() -> None:
    with ps.tensor_parallel_shard(2, 0), pytest.raises(RuntimeError, match="without a comm"):
        ps.all_reduce(torch.ones(2))
    with pytest.raises(RuntimeError, match="needs a communicator"):
        ps.initialize_tensor_parallel(2, 0)
    assert ps.get_tensor_parallel_world_size() == 1


def test_nccl_version_decoding() -> None:
    assert _decode_version(22703) == "2.27.3"
    assert _decode_version(21903) == "2.19.3"
    assert _decode_version(2804) == "2.8.4"


def test_missing_libnccl_names_the_fixes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "libnccl.so.2"
    monkeypatch.setenv(ENV_NCCL_PATH, str(missing))
    with pytest.raises(RuntimeError) as info:
        NcclLibrary()
    message = str(info.value)
    assert str(missing) in message
    assert "cacheflow-runtime[cu12]" in message and ENV_NCCL_PATH in message
