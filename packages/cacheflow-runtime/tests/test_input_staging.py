"""InputStaging packs a step's host arrays into one buffer and hands out views of its copy.

The packing (16-byte aligned offsets, dtypes, shapes, empty arrays, growth, slot rotation) is
the same on CPU with ``pack_on_cpu=True`` as on CUDA, where the buffer is pinned and the copy
asynchronous; the engine's CUDA tests run the CUDA path end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cacheflow_runtime.model_executor.input_staging import InputStaging


def _step_arrays(seed: int, tokens: int, seqs: int, width: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 32000, tokens, dtype=np.int64),
            rng.integers(0, 4096, tokens, dtype=np.int64),
            np.cumsum(np.r_[0, rng.integers(1, 9, seqs)]).astype(np.int32),
            rng.integers(1, 4096, seqs, dtype=np.int32),
            rng.integers(0, 10_000, (seqs, width), dtype=np.int32),
            rng.random(3, dtype=np.float32),
            np.empty(0, dtype=np.int64)]


def _assert_same(got: list[torch.Tensor], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.from_numpy(w).dtype
        assert tuple(g.shape) == w.shape
        assert g.data_ptr() % 16 == 0
        np.testing.assert_array_equal(g.numpy(), w)


@pytest.mark.parametrize("pack", [True, False])
def test_upload_round_trips_values_dtypes_and_shapes(pack: bool) -> None:
    staging = InputStaging(torch.device("cpu"), pack_on_cpu=pack)
    arrays = _step_arrays(0, tokens=37, seqs=5, width=3)
    _assert_same(staging.upload(arrays), arrays)


def test_views_of_a_step_survive_the_next_step_and_buffers_grow() -> None:
    staging = InputStaging(torch.device("cpu"), num_slots=2, pack_on_cpu=True)
    first_arrays = _step_arrays(1, tokens=5, seqs=2, width=1)
    first = staging.upload(first_arrays)
    # Bigger than the initial 64 KiB buffer: the second slot grows.
    second_arrays = _step_arrays(2, tokens=20_000, seqs=300, width=40)
    second = staging.upload(second_arrays)
    _assert_same(first, first_arrays)
    _assert_same(second, second_arrays)
    # The third step reuses the first slot: the first step's views now show the third's data.
    third_arrays = _step_arrays(3, tokens=5, seqs=2, width=1)
    third = staging.upload(third_arrays)
    _assert_same(third, third_arrays)
    assert third[0].data_ptr() == first[0].data_ptr()


def test_the_caller_may_reuse_its_arrays() -> None:
    staging = InputStaging(torch.device("cpu"), pack_on_cpu=True)
    ids = np.arange(10, dtype=np.int64)
    (got,) = staging.upload([ids])
    ids[:] = -1
    assert got.tolist() == list(range(10))


def test_non_contiguous_arrays_are_packed_in_order() -> None:
    staging = InputStaging(torch.device("cpu"), pack_on_cpu=True)
    table = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]
    (got,) = staging.upload([table])
    np.testing.assert_array_equal(got.numpy(), table)


def test_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="num_slots must be at least 1, got 0"):
        InputStaging(torch.device("cpu"), num_slots=0)
