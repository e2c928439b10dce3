"""The worker's block tables: one row per live sequence in a growable int32 matrix.

A decode step reads every scheduled sequence's table; keeping them as rows of one matrix
lets the step gather its tables, and compute the cache slot of every new token, with a few
array operations instead of a Python loop over sequences. A row changes only when its
sequence gets a new block (once every ``block_size`` tokens) or a new table (first sight,
swap-in, preemption, copy-on-write).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BlockTables:
    """Block tables of the sequences a worker knows, each a row of :attr:`table`; columns
    past a row's :attr:`num_blocks` hold 0. Rows and columns grow as needed."""

    def __init__(self, rows: int = 64, cols: int = 16) -> None:
        self.table = np.zeros((max(rows, 1), max(cols, 1)), dtype=np.int32)
        self.num_blocks = np.zeros(max(rows, 1), dtype=np.int32)
        self.row_of: dict[int, int] = {}
        self._free_rows = list(range(self.table.shape[0] - 1, -1, -1))

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.row_of

    def __len__(self) -> int:
        return len(self.row_of)

    def set(self, seq_id: int, block_ids: Sequence[int]) -> None:
        """Gives ``seq_id`` the table ``block_ids`` (a new row when it has none)."""
        row = self.row_of.get(seq_id)
        if row is None:
            row = self.row_of[seq_id] = self._take_row()
        n = len(block_ids)
        self._fit_cols(n)
        self.table[row, :n] = block_ids
        self.table[row, n:self.num_blocks[row]] = 0
        self.num_blocks[row] = n

    def extend(self, seq_id: int, block_ids: Sequence[int]) -> None:
        """Appends ``block_ids`` to the table of ``seq_id``.

        Raises:
            KeyError: ``seq_id`` has no table.
        """
        row = self.row_of[seq_id]
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        self._fit_cols(end)
        self.table[row, start:end] = block_ids
        self.num_blocks[row] = end

    def remove(self, seq_id: int) -> None:
        """Forgets ``seq_id`` (nothing when it has no table)."""
        row = self.row_of.pop(seq_id, None)
        if row is None:
            return
        self.table[row, :self.num_blocks[row]] = 0
        self.num_blocks[row] = 0
        self._free_rows.append(row)

    def blocks(self, seq_id: int) -> list[int]:
        """The table of ``seq_id`` as a list.

        Raises:
            KeyError: ``seq_id`` has no table.
        """
        row = self.row_of[seq_id]
        return self.table[row, :self.num_blocks[row]].tolist()

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The tables of ``rows`` as a new ``[len(rows), widest]`` int32 matrix (shorter
        tables padded with 0)."""
        width = int(self.num_blocks[rows].max()) if len(rows) else 0
        return self.table[rows, :width]

    def slots(self, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
        """The cache slot (``block * block_size + offset``, int64) of the token at
        ``positions[i]`` of the sequence in row ``rows[i]``.

        Raises:
            IndexError: a position lies past its sequence's blocks.
        """
        columns = positions // block_size
        if len(rows) and np.any(columns >= self.num_blocks[rows]):
            bad = int(np.argmax(columns >= self.num_blocks[rows]))
            raise IndexError(f"token position {int(positions[bad])} is past the "
                             f"{int(self.num_blocks[rows[bad]])} blocks of its sequence")
        return self.table[rows, columns].astype(np.int64) * block_size + positions % block_size

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _fit_cols(self, n: int) -> None:
        cols = self.table.shape[1]
        if n <= cols:
            return
        while cols < n:
            cols *= 2
        wider = np.zeros((self.table.shape[0], cols), dtype=np.int32)
        wider[:, :self.table.shape[1]] = self.table
        self.table = wider
