"""KV cache blocks: per-device allocators, per-sequence block tables and the prefix cache.

A sequence's KV cache lives in fixed-size blocks (``block_size`` tokens each). Its block table
maps logical block ``i`` (tokens ``i*block_size .. (i+1)*block_size - 1``) to a physical block.
Physical blocks are reference-counted so that sequences forked from one another (parallel
sampling, beam search) and requests with a common prompt prefix share blocks; a shared block
is copied before it is written (copy-on-write). Whole groups can be swapped between GPU and CPU.

Prefix caching: once every token of a device block has been computed, the block is identified by
a hash chained over its parent block's hash and its own token ids (the chain starts from the
request's cache namespace, which separates anything that changes KV content, e.g. adapters).
A hash -> block map finds the longest cached prefix of a new prompt. A block whose last holder
frees it keeps its hash and stays cached; it is evicted, least recently freed first, only when a
block is needed and no uncached block is free.

The manager only decides where KV data goes; the cache engine moves the data (the swap and copy
pairs returned here) and the scheduler owns sequence statuses.
"""

from __future__ import annotations

import array
import enum
import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Optional

from cacheflow_runtime.sequence import Sequence, SequenceGroup, SequenceStatus

_BLOCK_SIZES = (8, 16, 32)

BlockHash = bytes
BlockTable = list["PhysicalBlock"]


def hash_block(parent: BlockHash, token_ids: list[int]) -> BlockHash:
    """The hash of a full block: its parent's hash chained with its token ids."""
    return hashlib.blake2b(parent + array.array("q", token_ids).tobytes(),
                           digest_size=16).digest()


def root_hash(namespace: str) -> BlockHash:
    """The parent hash of a request's first block, from its cache namespace."""
    return hashlib.blake2b(b"cacheflow-prefix:" + namespace.encode(), digest_size=16).digest()


class Device(enum.Enum):
    """Where a physical block lives."""

    GPU = enum.auto()
    CPU = enum.auto()


class PhysicalBlock:
    """One block of KV cache memory on one device.

    ``ref_count`` is the number of block tables that hold this block; 0 means it is free.
    ``block_hash`` is set while the block is in the prefix cache (device blocks only).
    """

    __slots__ = ("block_hash", "block_number", "device", "ref_count")

    def __init__(self, device: Device, block_number: int, ref_count: int = 0) -> None:
        self.device = device
        self.block_number = block_number
        self.ref_count = ref_count
        self.block_hash: Optional[BlockHash] = None

    def __repr__(self) -> str:
        return (f"PhysicalBlock(device={self.device.name}, block_number={self.block_number}, "
                f"ref_count={self.ref_count})")


class BlockAllocator:
    """Hands out the physical blocks of one device, takes them back, and keeps the prefix cache.

    Free blocks are either uncached (a LIFO list that starts in ascending order, so a fresh
    allocator hands out blocks 0, 1, 2, ...) or cached (they hold a hash; kept in the order they
    were freed and evicted oldest first). ``allocate`` prefers uncached blocks.
    """

    def __init__(self, device: Device, block_size: int, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._blocks = tuple(PhysicalBlock(device, i) for i in range(num_blocks))
        self._free: list[PhysicalBlock] = list(reversed(self._blocks))
        self._evictable: OrderedDict[int, PhysicalBlock] = OrderedDict()
        self._cached: dict[BlockHash, PhysicalBlock] = {}

    def allocate(self) -> PhysicalBlock:
        """Takes a free block (evicting the oldest cached one if no uncached block is free) and
        returns it with ``ref_count`` 1 and no hash.

        Raises:
            RuntimeError: no block is free.
        """
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            _, block = self._evictable.popitem(last=False)
            self._uncache(block)
        else:
            raise RuntimeError(f"out of {self.device.name} KV cache blocks: all "
                               f"{self.num_blocks} are in use")
        block.ref_count = 1
        return block

    def free(self, block: PhysicalBlock) -> None:
        """Drops one reference to ``block``; with none left it becomes free (and, if it holds a
        hash, stays cached until evicted).

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
            if block.block_hash is not None:
                self._evictable[block.block_number] = block
            else:
                self._free.append(block)

    def lookup(self, block_hash: BlockHash) -> Optional[PhysicalBlock]:
        """The cached block with this hash, if any (free or in use)."""
        return self._cached.get(block_hash)

    def touch(self, block: PhysicalBlock) -> None:
        """Takes one more reference to a cached block (a prefix-cache hit)."""
        if block.ref_count == 0:
            del self._evictable[block.block_number]
        block.ref_count += 1

    def register(self, block: PhysicalBlock, block_hash: BlockHash) -> None:
        """Puts a full, in-use block into the prefix cache under ``block_hash`` (a no-op when
        another block already holds that content, or this one is cached already)."""
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def reset_cache(self) -> None:
        """Forgets every cached hash; cached free blocks become plain free blocks."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        for block in self._evictable.values():
            self._free.append(block)
        self._evictable.clear()

    def _uncache(self, block: PhysicalBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None

    def get_num_free_blocks(self) -> int:
        """How many blocks are free (cached free blocks included: they can be evicted)."""
        return len(self._free) + len(self._evictable)

    def num_cached_blocks(self) -> int:
        """How many blocks hold a prefix-cache hash (in use or free)."""
        return len(self._cached)

    def check_consistency(self) -> None:
        """Raises AssertionError if the free lists, the cache map and the reference counts
        disagree (for tests)."""
        free_ids = [b.block_number for b in self._free]
        evictable_ids = list(self._evictable)
        assert len(set(free_ids)) == len(free_ids), "a block is twice in the free list"
        assert not set(free_ids) & set(evictable_ids), "a block is both free and evictable"
        for block in self._blocks:
            free = block.block_number in self._evictable or block in self._free
            assert free == (block.ref_count == 0), f"{block!r} free={free}"
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, f"{block!r} hash not mapped"
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, f"{block!r} maps to another hash"
        for block in self._evictable.values():
            assert block.block_hash is not None, f"uncached {block!r} is evictable"


class AllocStatus(enum.Enum):
    """Whether a prompt can get its blocks.

    OK: now. LATER: not now, but once other sequences free theirs. NEVER: it needs more blocks
    than the GPU can ever give it (the request must be rejected).
    """

    OK = enum.auto()
    LATER = enum.auto()
    NEVER = enum.auto()


class BlockSpaceManager:
    """Maps every live sequence to its block table and keeps the reference counts right.

    ``watermark`` is the fraction of GPU blocks that admitting new prompts must leave free, so that
    running sequences can still grow without being preempted right away. With
    ``enable_prefix_caching`` full device blocks are hashed and shared between requests.

    The worker keeps its own copy of every block table; :meth:`take_table_update` says what
    changed since the last call for a sequence (appended blocks, or the whole table when an
    entry was replaced).
    """

    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01, enable_prefix_caching: bool = False) -> None:
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
        self.enable_prefix_caching = enable_prefix_caching
        self._num_gpu_blocks = num_gpu_blocks
        self._num_cpu_blocks = num_cpu_blocks
        self.reset()

    def reset(self) -> None:
        """Forgets every block table and the prefix cache, and frees every block."""
        self._gpu_allocator = BlockAllocator(Device.GPU, self.block_size, self._num_gpu_blocks)
        self._cpu_allocator = BlockAllocator(Device.CPU, self.block_size, self._num_cpu_blocks)
        self._block_tables: dict[int, BlockTable] = {}
        # Per sequence: hashes of its full blocks so far, and how many of its blocks are cached.
        self._hashes: dict[int, list[BlockHash]] = {}
        self._num_registered: dict[int, int] = {}
        # Per sequence: how many blocks the worker's copy of the table has (absent: none valid).
        self._synced: dict[int, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ------------------------------------------------------------------------------ queries
    @property
    def num_total_gpu_blocks(self) -> int:
        """Number of GPU blocks, free or not."""
        return self._num_gpu_blocks

    @property
    def num_total_cpu_blocks(self) -> int:
        """Number of CPU blocks, free or not."""
        return self._num_cpu_blocks

    def get_num_free_gpu_blocks(self) -> int:
        """How many GPU blocks are free (cached ones that can be evicted included)."""
        return self._gpu_allocator.get_num_free_blocks()

    def get_num_free_cpu_blocks(self) -> int:
        """How many CPU blocks are free."""
        return self._cpu_allocator.get_num_free_blocks()

    def num_cached_blocks(self) -> int:
        """How many GPU blocks hold a prefix-cache hash."""
        return self._gpu_allocator.num_cached_blocks()

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

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------ prefix cache
    def find_cached_prefix(self, seq: Sequence, namespace: str = "") -> list[PhysicalBlock]:
        """The cached device blocks that hold the longest prefix of ``seq``'s tokens in full
        blocks (empty without prefix caching). At least one token is always left to compute:
        when every token is cached the last block is not used."""
        if not self.enable_prefix_caching:
            return []
        tokens = seq.get_token_ids()
        hashes = self._extend_hashes(seq, tokens, namespace, len(tokens) // self.block_size)
        hits: list[PhysicalBlock] = []
        for block_hash in hashes:
            block = self._gpu_allocator.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        if hits and len(hits) * self.block_size >= len(tokens):
            hits.pop()
        return hits

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Counts a prefix-cache lookup of ``num_tokens`` tokens of which ``num_hit_tokens``
        were found (the statistics the engine reports; nothing without prefix caching)."""
        if not self.enable_prefix_caching:
            return
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence, namespace: str = "",
                          num_tokens: Optional[int] = None) -> None:
        """Puts the blocks of ``seq`` that are full once its first ``num_tokens`` tokens
        (default: ``num_computed_tokens``) are computed into the prefix cache (a no-op without
        prefix caching or for swapped-out sequences).

        The scheduler calls it for the tokens of the step it is building: a request admitted
        later in the same step may then share those blocks, since every layer writes the whole
        batch's K/V before any of it attends. A block that holds a placeholder token (a step
        scheduled ahead, core/step_data.py) is not hashed: its content is not known yet.
        """
        if not self.enable_prefix_caching:
            return
        computed = seq.num_computed_tokens if num_tokens is None else num_tokens
        num_full = computed // self.block_size
        done = self._num_registered.get(seq.seq_id, 0)
        if num_full <= done:  # the common case: no block filled since the last call
            return
        table = self._block_tables.get(seq.seq_id)
        if table is None or table[0].device is not Device.GPU:
            return
        if seq.has_placeholder:
            num_full = min(num_full, (seq.get_len() - 1) // self.block_size)
        hashes = self._extend_hashes(seq, seq.get_token_ids(), namespace, num_full)
        for i in range(done, num_full):
            self._gpu_allocator.register(table[i], hashes[i])
        self._num_registered[seq.seq_id] = num_full

    def reset_prefix_cache(self) -> None:
        """Empties the prefix cache (blocks in use keep their data but are no longer shared
        with new requests)."""
        self._gpu_allocator.reset_cache()

    def _extend_hashes(self, seq: Sequence, tokens: list[int], namespace: str,
                       num_blocks: int) -> list[BlockHash]:
        hashes = self._hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else root_hash(namespace)
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs]))
        return hashes

    # ---------------------------------------------------------------------- admission
    def can_allocate(self, seq: Sequence, cached: list[PhysicalBlock],
                     num_tokens: int) -> AllocStatus:
        """Whether ``seq`` (no blocks yet) can get blocks for its first ``num_tokens`` tokens,
        ``cached`` (from :meth:`find_cached_prefix`) being reused; the watermark stays free."""
        if self.blocks_for(seq.get_len()) > self._num_gpu_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        num_new = max(0, self.blocks_for(num_tokens) - len(cached))
        num_revived = sum(1 for block in cached if block.ref_count == 0)
        free_after = self.get_num_free_gpu_blocks() - num_revived - num_new
        return AllocStatus.OK if free_after >= self.watermark_blocks else AllocStatus.LATER

    def allocate(self, seq: Sequence, cached: list[PhysicalBlock], num_tokens: int) -> None:
        """Gives ``seq`` a block table: the ``cached`` prefix blocks (shared) and new blocks up
        to ``num_tokens`` tokens. The watermark is not checked here (``can_allocate`` does);
        nothing changes on failure.

        Raises:
            ValueError: ``seq`` already has blocks.
            RuntimeError: not enough free GPU blocks.
        """
        if seq.seq_id in self._block_tables:
            raise ValueError(f"sequence {seq.seq_id} already has a block table")
        num_new = max(0, self.blocks_for(num_tokens) - len(cached))
        num_revived = sum(1 for block in cached if block.ref_count == 0)
        self._check_free(self._gpu_allocator, num_new + num_revived, f"sequence {seq.seq_id}")
        for block in cached:  # before allocating: a fresh block may evict an unheld hit
            self._gpu_allocator.touch(block)
        table = list(cached) + [self._gpu_allocator.allocate() for _ in range(num_new)]
        self._block_tables[seq.seq_id] = table
        self._num_registered[seq.seq_id] = len(cached)
        self._synced.pop(seq.seq_id, None)

    # ------------------------------------------------------------------------ growth
    def num_blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """GPU blocks :meth:`grow` takes to cover ``num_tokens`` tokens (new blocks, plus one
        when the first block written is shared and must be copied)."""
        table = self._block_tables.get(seq.seq_id)
        if table is None:
            raise KeyError(f"sequence {seq.seq_id} has no block table")
        block_size = self.block_size
        num_blocks = len(table)
        first = seq.num_computed_tokens // block_size
        new = -(-num_tokens // block_size) - num_blocks
        need = new if new > 0 else 0
        if first < num_blocks and table[first].ref_count > 1:
            need += 1
        return need

    def num_tokens_growable(self, seq: Sequence) -> int:
        """Tokens past ``seq.num_computed_tokens`` that the free GPU blocks let :meth:`grow`
        cover (the space left in its last block included; 0 when a shared first block needs a
        copy and no block is free)."""
        table = self._block_tables.get(seq.seq_id)
        if table is None:
            raise KeyError(f"sequence {seq.seq_id} has no block table")
        blocks = len(table) + self.get_num_free_gpu_blocks()
        first = seq.num_computed_tokens // self.block_size
        if first < len(table) and table[first].ref_count > 1:
            blocks -= 1  # the copy of the shared block
        return max(0, blocks * self.block_size - seq.num_computed_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> Optional[tuple[int, int]]:
        """Makes ``seq``'s table cover ``num_tokens`` tokens before a step that writes the K/V of
        tokens ``num_computed_tokens .. num_tokens - 1``. The block holding the first of them,
        if shared, is copied first.

        Returns:
            ``(src_block, dst_block)`` of a device copy the caller must do before the step
            (copy-on-write), else None.

        Raises:
            KeyError: ``seq`` has no blocks.
            ValueError: its blocks are not on the GPU.
            RuntimeError: not enough free GPU blocks (nothing changes then).
        """
        table = self._table(seq)
        if table and table[-1].device is not Device.GPU:
            raise ValueError(f"sequence {seq.seq_id} is swapped out; swap it in first")
        self._check_free(self._gpu_allocator, self.num_blocks_to_grow(seq, num_tokens),
                         f"sequence {seq.seq_id}")
        cow = None
        first = seq.num_computed_tokens // self.block_size
        if first < len(table) and table[first].ref_count > 1:
            old, new = table[first], self._gpu_allocator.allocate()
            self._gpu_allocator.free(old)
            table[first] = new
            cow = (old.block_number, new.block_number)
            self._synced.pop(seq.seq_id, None)
        while len(table) < self.blocks_for(num_tokens):
            table.append(self._gpu_allocator.allocate())
        return cow

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
        self._hashes[child_seq.seq_id] = list(self._hashes.get(parent_seq.seq_id, []))
        self._num_registered[child_seq.seq_id] = self._num_registered.get(parent_seq.seq_id, 0)

    def take_table_update(self, seq: Sequence) -> tuple[Optional[list[int]], list[int]]:
        """What the worker's copy of ``seq``'s table needs since the last call: ``(whole table,
        [])`` when an entry was replaced (or the worker has none), else ``(None, appended
        block numbers)``."""
        table = self._block_tables.get(seq.seq_id)
        if table is None:
            raise KeyError(f"sequence {seq.seq_id} has no block table")
        num_blocks = len(table)
        synced = self._synced.get(seq.seq_id)
        if synced == num_blocks:  # most sequences in most steps
            return None, []
        self._synced[seq.seq_id] = num_blocks
        if synced is None:
            return [b.block_number for b in table], []
        return None, [b.block_number for b in table[synced:]]

    # ---------------------------------------------------------------------- swapping
    def can_swap_in(self, seq_group: SequenceGroup) -> bool:
        """Whether the SWAPPED sequences of ``seq_group`` fit on the GPU.

        Besides their blocks, one block per sequence is reserved for the next step's growth
        and the watermark is kept free, so that a group swapped in can run at least one step.
        """
        seqs = seq_group.get_seqs(SequenceStatus.SWAPPED)
        num_required = len(self._unique_blocks(seqs)) + len(seqs)
        return self.get_num_free_gpu_blocks() - num_required >= self.watermark_blocks

    def swap_in(self, seq_group: SequenceGroup) -> list[tuple[int, int]]:
        """Moves the blocks of the group's SWAPPED sequences from CPU to GPU.

        A block shared by several of them becomes one GPU block with the same sharing; the CPU
        blocks are freed. Nothing changes on failure.

        Returns:
            (CPU block, GPU block) pairs for the cache engine to copy.

        Raises:
            KeyError: a SWAPPED sequence has no blocks.
            ValueError: one of its blocks is not on the CPU.
            RuntimeError: not enough free GPU blocks.
        """
        seqs = seq_group.get_seqs(SequenceStatus.SWAPPED)
        pairs = self._move(seqs, self._cpu_allocator, self._gpu_allocator,
                           f"swap-in of request {seq_group.request_id}")
        for seq in seqs:
            self._num_registered[seq.seq_id] = 0  # fresh blocks: cache them again
        return pairs

    def can_swap_out(self, seq_group: SequenceGroup) -> bool:
        """Whether the blocks of the group's RUNNING sequences fit in free CPU blocks."""
        seqs = seq_group.get_seqs(SequenceStatus.RUNNING)
        return len(self._unique_blocks(seqs)) <= self.get_num_free_cpu_blocks()

    def swap_out(self, seq_group: SequenceGroup) -> list[tuple[int, int]]:
        """Moves the blocks of the group's RUNNING sequences from GPU to CPU (cached GPU blocks
        stay in the prefix cache once freed).

        Returns:
            (GPU block, CPU block) pairs for the cache engine to copy.

        Raises:
            KeyError: a RUNNING sequence has no blocks.
            ValueError: one of its blocks is not on the GPU.
            RuntimeError: not enough free CPU blocks.
        """
        seqs = seq_group.get_seqs(SequenceStatus.RUNNING)
        return self._move(seqs, self._gpu_allocator, self._cpu_allocator,
                          f"swap-out of request {seq_group.request_id}")

    # ------------------------------------------------------------------------- release
    def free(self, seq: Sequence) -> None:
        """Releases ``seq``'s blocks (a no-op if it has none). The last blocks are released
        first, so that a cached prefix outlives the tail that follows it."""
        table = self._block_tables.pop(seq.seq_id, None)
        self._synced.pop(seq.seq_id, None)
        self._num_registered.pop(seq.seq_id, None)
        if table is None:
            return
        for block in reversed(table):
            self._allocator(block.device).free(block)

    def forget(self, seq: Sequence) -> None:
        """Drops everything kept about ``seq`` (its blocks and its prefix hashes)."""
        self.free(seq)
        self._hashes.pop(seq.seq_id, None)

    def check_consistency(self) -> None:
        """Raises AssertionError if reference counts differ from the number of tables that hold
        each block, or the allocators are inconsistent (for tests)."""
        holders: dict[tuple[Device, int], int] = {}
        for table in self._block_tables.values():
            for block in table:
                key = (block.device, block.block_number)
                holders[key] = holders.get(key, 0) + 1
        for allocator in (self._gpu_allocator, self._cpu_allocator):
            allocator.check_consistency()
            for block in allocator._blocks:
                expected = holders.get((block.device, block.block_number), 0)
                assert block.ref_count == expected, f"{block!r} has {expected} holders"

    # ------------------------------------------------------------------------- helpers
    def _table(self, seq: Sequence) -> BlockTable:
        try:
            return self._block_tables[seq.seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq.seq_id} has no block table") from None

    def _allocator(self, device: Device) -> BlockAllocator:
        return self._gpu_allocator if device is Device.GPU else self._cpu_allocator

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
              what: str) -> list[tuple[int, int]]:
        for seq in seqs:
            for block in self._table(seq):
                if block.device is not src.device:
                    raise ValueError(f"sequence {seq.seq_id} holds a {block.device.name} block; "
                                     f"{what} expects {src.device.name} blocks")
        self._check_free(dst, len(self._unique_blocks(seqs)), what)
        pairs: list[tuple[int, int]] = []
        new_blocks: dict[int, PhysicalBlock] = {}
        for seq in seqs:
            new_table: BlockTable = []
            for block in self._block_tables[seq.seq_id]:
                new = new_blocks.get(block.block_number)
                if new is None:
                    new = dst.allocate()
                    new_blocks[block.block_number] = new
                    pairs.append((block.block_number, new.block_number))
                else:
                    new.ref_count += 1
                # One reference per table entry moves over; a holder outside ``seqs`` (if any)
                # keeps the old block alive with its remaining references.
                src.free(block)
                new_table.append(new)
            self._block_tables[seq.seq_id] = new_table
            self._synced.pop(seq.seq_id, None)
        return pairs
