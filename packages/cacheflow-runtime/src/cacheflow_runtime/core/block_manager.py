"""KV cache blocks: a per-device allocator and the manager of per-sequence block tables.

A sequence's KV cache lives in fixed-size blocks (``block_size`` tokens each). Its block table
maps logical block ``i`` (tokens ``i*block_size .. (i+1)*block_size - 1``) to a physical block.
Physical blocks are reference-counted so that sequences forked from one another (parallel
sampling, beam search) share their common prefix; a shared block is copied before it is written
(copy-on-write). Whole groups can be swapped between GPU and CPU memory.

The manager only decides where KV data goes; the cache engine moves the data (swap and
copy-on-write mappings returned here) and the scheduler owns sequence statuses.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from cacheflow_runtime.sequence import Sequence, SequenceGroup, SequenceStatus

_BLOCK_SIZES = (8, 16, 32)

BlockTable = list["PhysicalBlock"]


class Device(enum.Enum):
    """Where a physical block lives."""

    GPU = enum.auto()
    CPU = enum.auto()


class PhysicalBlock:
    """One block of KV cache memory on one device.

    ``ref_count`` is the number of block tables that hold this block; 0 means it is free.
    """

    # Prefix caching will add a content hash and a last-access time here.
    __slots__ = ("block_number", "device", "ref_count")

    def __init__(self, device: Device, block_number: int, ref_count: int = 0) -> None:
        self.device = device
        self.block_number = block_number
        self.ref_count = ref_count

    def __repr__(self) -> str:
        return (f"PhysicalBlock(device={self.device.name}, block_number={self.block_number}, "
                f"ref_count={self.ref_count})")


class BlockAllocator:
    """Hands out the physical blocks of one device and takes them back.

    The free list is LIFO and starts in ascending order, so a fresh allocator hands out blocks
    0, 1, 2, ... and the most recently freed block is reused first (deterministic).
    """

    def __init__(self, device: Device, block_size: int, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._blocks = tuple(PhysicalBlock(device, i) for i in range(num_blocks))
        self._free: list[PhysicalBlock] = list(reversed(self._blocks))

    def allocate(self) -> PhysicalBlock:
        """Takes a free block and returns it with ``ref_count`` 1.

        Raises:
            RuntimeError: no block is free.
        """
        if not self._free:
            raise RuntimeError(f"out of {self.device.name} KV cache blocks: all "
                               f"{self.num_blocks} are in use")
        block = self._free.pop()
        block.ref_count = 1
        return block

    def free(self, block: PhysicalBlock) -> None:
        """Drops one reference to ``block``; it goes back to the free list when none are left.

        Raises:
            ValueError: ``block`` does not belong to this allocator or is already free.
        """
        if (block.device is not self.device or not 0 <= block.block_number < self.num_blocks
                or self._blocks[block.block_number] is not block):
            raise ValueError(f"{block!r} does not belong to this {self.device.name} allocator")
        if block.ref_count <= 0:
            raise ValueError(f"double free: {self.device.name} block {block.block_number} "
                             f"is already free")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free.append(block)

    def get_num_free_blocks(self) -> int:
        """How many blocks are free."""
        return len(self._free)


class AllocStatus(enum.Enum):
    """Whether a sequence group's prompt can get its blocks.

    OK: now. LATER: not now, but once other sequences free theirs. NEVER: it needs more blocks
    than the GPU can ever give it (the request must be rejected).
    """

    OK = enum.auto()
    LATER = enum.auto()
    NEVER = enum.auto()


class BlockSpaceManager:
    """Maps every live sequence to its block table and keeps the reference counts right.

    ``watermark`` is the fraction of GPU blocks that admitting new prompts must leave free, so that
    running sequences can still grow without being preempted right away.
    """

    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01) -> None:
        if block_size not in _BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {', '.join(map(str, _BLOCK_SIZES))}, "
                             f"got {block_size!r}")
        if not isinstance(num_gpu_blocks, int) or num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be an integer >= 1, got {num_gpu_blocks!r}")
        if not isinstance(num_cpu_blocks, int) or num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be an integer >= 0, got {num_cpu_blocks!r}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        self.block_size = block_size
        self.watermark = watermark
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self._num_gpu_blocks = num_gpu_blocks
        self._num_cpu_blocks = num_cpu_blocks
        self.reset()

    def reset(self) -> None:
        """Forgets every block table and frees every block."""
        self._gpu_allocator = BlockAllocator(Device.GPU, self.block_size, self._num_gpu_blocks)
        self._cpu_allocator = BlockAllocator(Device.CPU, self.block_size, self._num_cpu_blocks)
        self._block_tables: dict[int, BlockTable] = {}

    @property
    def num_total_gpu_blocks(self) -> int:
        """Number of GPU blocks, free or not."""
        return self._num_gpu_blocks

    @property
    def num_total_cpu_blocks(self) -> int:
        """Number of CPU blocks, free or not."""
        return self._num_cpu_blocks

    def get_num_free_gpu_blocks(self) -> int:
        """How many GPU blocks are free."""
        return self._gpu_allocator.get_num_free_blocks()

    def get_num_free_cpu_blocks(self) -> int:
        """How many CPU blocks are free."""
        return self._cpu_allocator.get_num_free_blocks()

    def gpu_usage(self) -> float:
        """Fraction of GPU blocks in use, in [0, 1]."""
        return 1.0 - self.get_num_free_gpu_blocks() / self._num_gpu_blocks

    def get_block_table(self, seq: Sequence) -> list[int]:
        """The physical block numbers of ``seq``, in logical order.

        Raises:
            KeyError: ``seq`` has no blocks.
        """
        return [block.block_number for block in self._table(seq)]

    def has_block_table(self, seq: Sequence) -> bool:
        """True if ``seq`` holds blocks (on either device)."""
        return seq.seq_id in self._block_tables

    # Admission of prompts.

    def can_allocate(self, seq_group: SequenceGroup) -> AllocStatus:
        """Whether the WAITING sequences of ``seq_group`` (one shared prompt) can get blocks.

        Raises:
            ValueError: the group has no WAITING sequence.
        """
        num_required = self._waiting_prompt(seq_group)[0].num_blocks_needed
        if num_required > self._num_gpu_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        if self.get_num_free_gpu_blocks() - num_required < self.watermark_blocks:
            return AllocStatus.LATER
        return AllocStatus.OK

    def allocate(self, seq_group: SequenceGroup) -> None:
        """Gives the WAITING sequences of ``seq_group`` one shared set of prompt blocks.

        Each block's ``ref_count`` becomes the number of WAITING sequences. The watermark is not
        checked here (that is ``can_allocate``'s job); nothing is allocated on failure.

        Raises:
            ValueError: no WAITING sequence, their lengths differ, or one already has blocks.
            RuntimeError: not enough free GPU blocks.
        """
        seqs = self._waiting_prompt(seq_group)
        for seq in seqs:
            if seq.seq_id in self._block_tables:
                raise ValueError(f"sequence {seq.seq_id} already has a block table")
        num_required = seqs[0].num_blocks_needed
        self._check_free(self._gpu_allocator, num_required, f"request {seq_group.request_id}")
        table = [self._gpu_allocator.allocate() for _ in range(num_required)]
        for block in table:
            block.ref_count = len(seqs)
        for seq in seqs:
            self._block_tables[seq.seq_id] = list(table)

    # Decoding.

    def can_append_slots(self, seq_group: SequenceGroup) -> bool:
        """Whether every RUNNING sequence of ``seq_group`` could get one new GPU block.

        Conservative: each sequence needs at most one block per step (a new block or a
        copy-on-write copy), often none.
        """
        return self.get_num_free_gpu_blocks() >= seq_group.num_seqs(SequenceStatus.RUNNING)

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Makes ``seq``'s block table cover all ``seq.get_len()`` tokens before a decode step.

        Call it after the newest token was appended to ``seq`` and before the step that writes
        that token's KV data. The token lands either in a new block (allocated here) or in the
        last block; if that block is shared with another sequence it is copied first.

        Returns:
            ``(src_block_number, dst_block_number)`` of a GPU copy the caller must do before the
            step (copy-on-write), else None.

        Raises:
            KeyError: ``seq`` has no blocks.
            ValueError: its blocks are not on the GPU, or it grew by more than one block.
            RuntimeError: no GPU block is free.
        """
        table = self._table(seq)
        if table and table[-1].device is not Device.GPU:
            raise ValueError(f"sequence {seq.seq_id} is swapped out; swap it in first")
        num_missing = seq.num_blocks_needed - len(table)
        if num_missing > 1:
            raise ValueError(f"sequence {seq.seq_id} needs {seq.num_blocks_needed} blocks but "
                             f"has {len(table)}; append_slot covers one new token per call")
        if num_missing == 1:
            table.append(self._gpu_allocator.allocate())
            return None
        last = table[-1]
        if last.ref_count == 1:
            return None
        new = self._gpu_allocator.allocate()
        self._gpu_allocator.free(last)
        table[-1] = new
        return last.block_number, new.block_number

    def fork(self, parent_seq: Sequence, child_seq: Sequence) -> None:
        """Gives ``child_seq`` the blocks of ``parent_seq`` (shared; copied on write).

        Raises:
            KeyError: the parent has no blocks.
            ValueError: the child already has blocks.
        """
        table = self._table(parent_seq)
        if child_seq.seq_id in self._block_tables:
            raise ValueError(f"sequence {child_seq.seq_id} already has a block table")
        for block in table:
            block.ref_count += 1
        self._block_tables[child_seq.seq_id] = list(table)

    # Swapping.

    def can_swap_in(self, seq_group: SequenceGroup) -> bool:
        """Whether the SWAPPED sequences of ``seq_group`` fit on the GPU.

        Besides their blocks, one block per sequence is reserved for the next ``append_slot``
        and the watermark is kept free, so that a group swapped in can run at least one step.
        """
        seqs = seq_group.get_seqs(SequenceStatus.SWAPPED)
        num_required = len(self._unique_blocks(seqs)) + len(seqs)
        return self.get_num_free_gpu_blocks() - num_required >= self.watermark_blocks

    def swap_in(self, seq_group: SequenceGroup) -> dict[int, int]:
        """Moves the blocks of the group's SWAPPED sequences from CPU to GPU.

        A block shared by several of them becomes one GPU block with the same sharing; the CPU
        blocks are freed. Nothing changes on failure.

        Returns:
            CPU block number -> GPU block number, for the cache engine to copy.

        Raises:
            KeyError: a SWAPPED sequence has no blocks.
            ValueError: one of its blocks is not on the CPU.
            RuntimeError: not enough free GPU blocks.
        """
        seqs = seq_group.get_seqs(SequenceStatus.SWAPPED)
        return self._move(seqs, self._cpu_allocator, self._gpu_allocator,
                          f"swap-in of request {seq_group.request_id}")

    def can_swap_out(self, seq_group: SequenceGroup) -> bool:
        """Whether the blocks of the group's RUNNING sequences fit in free CPU blocks."""
        seqs = seq_group.get_seqs(SequenceStatus.RUNNING)
        return len(self._unique_blocks(seqs)) <= self.get_num_free_cpu_blocks()

    def swap_out(self, seq_group: SequenceGroup) -> dict[int, int]:
        """Moves the blocks of the group's RUNNING sequences from GPU to CPU.

        A block shared by several of them becomes one CPU block with the same sharing; the GPU
        blocks are freed. Nothing changes on failure.

        Returns:
            GPU block number -> CPU block number, for the cache engine to copy.

        Raises:
            KeyError: a RUNNING sequence has no blocks.
            ValueError: one of its blocks is not on the GPU.
            RuntimeError: not enough free CPU blocks.
        """
        seqs = seq_group.get_seqs(SequenceStatus.RUNNING)
        return self._move(seqs, self._gpu_allocator, self._cpu_allocator,
                          f"swap-out of request {seq_group.request_id}")

    # Release.

    def free(self, seq: Sequence) -> None:
        """Releases ``seq``'s blocks (a no-op if it has none)."""
        table = self._block_tables.pop(seq.seq_id, None)
        if table is None:
            return
        for block in table:
            self._allocator(block.device).free(block)

    # Helpers.

    def _table(self, seq: Sequence) -> BlockTable:
        try:
            return self._block_tables[seq.seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq.seq_id} has no block table") from None

    def _allocator(self, device: Device) -> BlockAllocator:
        return self._gpu_allocator if device is Device.GPU else self._cpu_allocator

    def _waiting_prompt(self, seq_group: SequenceGroup) -> list[Sequence]:
        seqs = seq_group.get_seqs(SequenceStatus.WAITING)
        if not seqs:
            raise ValueError(f"request {seq_group.request_id} has no WAITING sequence")
        if len({seq.get_len() for seq in seqs}) != 1:
            raise ValueError(f"the WAITING sequences of request {seq_group.request_id} must "
                             f"share one prompt, got lengths {[s.get_len() for s in seqs]}")
        return seqs

    def _unique_blocks(self, seqs: Iterable[Sequence]) -> list[PhysicalBlock]:
        seen: dict[int, PhysicalBlock] = {}
        for seq in seqs:
            for block in self._table(seq):
                seen.setdefault(id(block), block)
        return list(seen.values())

    @staticmethod
    def _check_free(allocator: BlockAllocator, num_required: int, what: str) -> None:
        num_free = allocator.get_num_free_blocks()
        if num_required > num_free:
            raise RuntimeError(f"out of {allocator.device.name} KV cache blocks for {what}: "
                               f"needs {num_required}, {num_free} free")

    def _move(self, seqs: list[Sequence], src: BlockAllocator, dst: BlockAllocator,
              what: str) -> dict[int, int]:
        for seq in seqs:
            for block in self._table(seq):
                if block.device is not src.device:
                    raise ValueError(f"sequence {seq.seq_id} holds a {block.device.name} block; "
                                     f"{what} expects {src.device.name} blocks")
        self._check_free(dst, len(self._unique_blocks(seqs)), what)
        mapping: dict[int, int] = {}
        new_blocks: dict[int, PhysicalBlock] = {}
        for seq in seqs:
            new_table: BlockTable = []
            for block in self._block_tables[seq.seq_id]:
                new = new_blocks.get(block.block_number)
                if new is None:
                    new = dst.allocate()
                    new_blocks[block.block_number] = new
                    mapping[block.block_number] = new.block_number
                else:
                    new.ref_count += 1
                # One reference per table entry moves over; a holder outside ``seqs`` (if any)
                # keeps the old block alive with its remaining references.
                src.free(block)
                new_table.append(new)
            self._block_tables[seq.seq_id] = new_table
        return mapping
