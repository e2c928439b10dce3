"""The worker's block tables (model_executor/block_tables.py): rows grow, shrink and are reused
without leaking old entries, and the step's tables and slots match a per-sequence reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheflow_runtime.model_executor.block_tables import BlockTables


def test_set_extend_remove_and_row_reuse() -> None:
    tables = BlockTables(rows=1, cols=2)
    tables.set(7, [3, 4, 5])  # wider than the initial columns
    tables.set(9, [8])  # more rows than the initial one
    tables.extend(9, [10, 11])
    assert tables.blocks(7) == [3, 4, 5] and tables.blocks(9) == [8, 10, 11]
    tables.set(7, [6])  # replaced by a shorter table: the old tail is cleared
    assert tables.blocks(7) == [6]
    rows = np.array([tables.row_of[7], tables.row_of[9]])
    assert tables.gather(rows).tolist() == [[6, 0, 0], [8, 10, 11]]
    row_of_7 = tables.row_of[7]
    tables.remove(7)
    assert 7 not in tables and len(tables) == 1
    tables.set(12, [1])
    assert tables.row_of[12] == row_of_7  # the freed row is reused, without its old blocks
    assert tables.table[row_of_7].tolist()[:3] == [1, 0, 0]
    with pytest.raises(KeyError):
        tables.extend(7, [1])


def test_slots_of_positions_and_a_position_past_the_blocks() -> None:
    tables = BlockTables()
    tables.set(1, [4, 9])
    tables.set(2, [5])
    rows = np.array([tables.row_of[1], tables.row_of[1], tables.row_of[2]])
    positions = np.array([0, 17, 15])
    assert tables.slots(rows, positions, 16).tolist() == [64, 9 * 16 + 1, 5 * 16 + 15]
    with pytest.raises(IndexError, match="position 16 is past the 1 blocks"):
        tables.slots(np.array([tables.row_of[2]]), np.array([16]), 16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.lists(st.integers(0, 999), max_size=6),
                          st.sampled_from(["set", "extend", "remove"])), max_size=40))
def test_matches_a_dict_of_lists(ops: list[tuple[int, list[int], str]]) -> None:
    tables, reference = BlockTables(rows=2, cols=1), {}
    for seq_id, blocks, op in ops:
        if op == "set":
            tables.set(seq_id, blocks)
            reference[seq_id] = list(blocks)
        elif op == "extend" and seq_id in reference:
            tables.extend(seq_id, blocks)
            reference[seq_id] += blocks
        elif op == "remove":
            tables.remove(seq_id)
            reference.pop(seq_id, None)
    assert {s: tables.blocks(s) for s in reference} == reference
    ids = sorted(reference)
    gathered = tables.gather(np.array([tables.row_of[s] for s in ids], dtype=np.int64))
    width = max((len(b) for b in reference.values()), default=0)
    assert gathered.tolist() == [reference[s] + [0] * (width - len(reference[s])) for s in ids]
