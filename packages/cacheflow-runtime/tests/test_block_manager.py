"""Tests of the KV block allocator and the block space manager (prefix caching included)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cacheflow_runtime.core.block_manager import (
    AllocStatus,
    BlockAllocator,
    BlockSpaceManager,
    Device,
    PhysicalBlock,
    hash_block,
    root_hash,
)
from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.sequence import Sequence, SequenceGroup, SequenceStatus

RUNNING = SequenceStatus.RUNNING
SWAPPED = SequenceStatus.SWAPPED


def make_group(request_id: str, prompt_len: int, num_seqs: int, block_size: int,
               first_seq_id: int = 0, prompt: list[int] | None = None) -> SequenceGroup:
    """A group of ``num_seqs`` WAITING sequences sharing a prompt of ``prompt_len`` tokens."""
    prompt = prompt if prompt is not None else list(range(100, 100 + prompt_len))
    seqs = [Sequence(first_seq_id + i, None, prompt, block_size) for i in range(num_seqs)]
    return SequenceGroup(request_id, seqs, SamplingParams(n=num_seqs))


def allocate(bm: BlockSpaceManager, group: SequenceGroup, cached: bool = False) -> None:
    """Gives the group's first sequence its whole prompt (after its cached prefix when
    ``cached``) and forks the others from it, as the scheduler and parallel sampling do."""
    first = group.seqs[0]
    hits = bm.find_cached_prefix(first) if cached else []
    bm.allocate(first, hits, first.get_len())
    first.num_computed_tokens = first.get_len()
    for seq in group.seqs[1:]:
        bm.fork(first, seq)
        seq.num_computed_tokens = seq.get_len()


def set_status(group: SequenceGroup, status: SequenceStatus) -> None:
    for seq in group.seqs:
        seq.status = status


def add_token(seq: Sequence, token_id: int = 7) -> None:
    seq.append_token(token_id, {token_id: -0.5})


def append(bm: BlockSpaceManager, seq: Sequence) -> tuple[int, int] | None:
    """Covers the newest token of ``seq`` (a decode step); returns the copy-on-write pair."""
    seq.num_computed_tokens = seq.get_len() - 1
    pair = bm.grow(seq, seq.get_len())
    seq.num_computed_tokens = seq.get_len()
    return pair


def ref_counts(bm: BlockSpaceManager, seq: Sequence) -> list[int]:
    return [block.ref_count for block in bm._block_tables[seq.seq_id]]


# BlockAllocator


def test_allocator_hands_out_blocks_in_order_and_reuses_the_last_freed():
    alloc = BlockAllocator(Device.GPU, 16, 3)
    blocks = [alloc.allocate() for _ in range(3)]
    assert [b.block_number for b in blocks] == [0, 1, 2]
    assert all(b.ref_count == 1 and b.device is Device.GPU for b in blocks)
    assert alloc.get_num_free_blocks() == 0
    alloc.free(blocks[1])
    alloc.free(blocks[0])
    assert alloc.get_num_free_blocks() == 2
    assert alloc.allocate().block_number == 0
    assert alloc.allocate().block_number == 1


def test_allocator_out_of_blocks():
    alloc = BlockAllocator(Device.CPU, 8, 1)
    alloc.allocate()
    with pytest.raises(RuntimeError, match="out of CPU KV cache blocks: all 1 are in use"):
        alloc.allocate()


def test_allocator_free_decrements_and_rejects_double_free():
    alloc = BlockAllocator(Device.GPU, 8, 2)
    block = alloc.allocate()
    block.ref_count = 2
    alloc.free(block)
    assert block.ref_count == 1
    assert alloc.get_num_free_blocks() == 1
    alloc.free(block)
    assert block.ref_count == 0
    assert alloc.get_num_free_blocks() == 2
    with pytest.raises(ValueError, match="double free: GPU block 0"):
        alloc.free(block)
    assert alloc.get_num_free_blocks() == 2


def test_allocator_rejects_foreign_block():
    gpu = BlockAllocator(Device.GPU, 8, 2)
    cpu = BlockAllocator(Device.CPU, 8, 2)
    with pytest.raises(ValueError, match="does not belong"):
        gpu.free(cpu.allocate())
    with pytest.raises(ValueError, match="does not belong"):
        gpu.free(PhysicalBlock(Device.GPU, 0, ref_count=1))


# BlockSpaceManager


@pytest.mark.parametrize("block_size", [0, 4, 12, 64])
def test_block_size_must_be_supported(block_size):
    with pytest.raises(ValueError, match="block_size must be one of 8, 16, 32"):
        BlockSpaceManager(block_size, 10, 10)


def test_forked_seqs_share_prompt_blocks():
    bm = BlockSpaceManager(8, num_gpu_blocks=10, num_cpu_blocks=4, watermark=0.0)
    group = make_group("r", prompt_len=20, num_seqs=3, block_size=8)
    assert bm.can_allocate(group.seqs[0], [], 20) is AllocStatus.OK
    allocate(bm, group)
    for seq in group.seqs:
        assert bm.get_block_table(seq) == [0, 1, 2]
        assert ref_counts(bm, seq) == [3, 3, 3]
    assert bm.get_num_free_gpu_blocks() == 7
    assert bm.get_num_free_cpu_blocks() == 4
    assert bm.gpu_usage() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="already has a block table"):
        bm.allocate(group.seqs[0], [], 20)


def test_allocate_is_atomic_when_out_of_blocks():
    bm = BlockSpaceManager(8, num_gpu_blocks=2, num_cpu_blocks=0, watermark=0.0)
    group = make_group("big", prompt_len=17, num_seqs=1, block_size=8)
    seq = group.seqs[0]
    assert bm.can_allocate(seq, [], 17) is AllocStatus.NEVER
    with pytest.raises(RuntimeError, match="needs 3, 2 free"):
        bm.allocate(seq, [], 17)
    assert bm.get_num_free_gpu_blocks() == 2
    assert not bm.has_block_table(seq)
    # A first chunk of the same prompt fits; the prompt as a whole never will.
    bm.allocate(seq, [], 9)
    assert bm.get_block_table(seq) == [0, 1]


def test_watermark_gives_later_and_never():
    bm = BlockSpaceManager(16, num_gpu_blocks=100, num_cpu_blocks=0, watermark=0.1)
    assert bm.watermark_blocks == 10

    def status(prompt_len: int, seq_id: int = 9) -> AllocStatus:
        seq = make_group("x", prompt_len, 1, 16, seq_id).seqs[0]
        return bm.can_allocate(seq, [], prompt_len)

    assert status(91 * 16) is AllocStatus.NEVER
    assert status(90 * 16) is AllocStatus.OK
    first = make_group("c", 50 * 16, 1, 16)
    allocate(bm, first)
    assert bm.get_num_free_gpu_blocks() == 50
    assert status(40 * 16) is AllocStatus.OK
    # 41 blocks would leave 9 free, under the watermark of 10: wait, do not reject.
    assert status(40 * 16 + 1) is AllocStatus.LATER
    bm.free(first.seqs[0])
    assert status(40 * 16 + 1) is AllocStatus.OK


def test_grow_allocates_only_at_block_boundaries():
    bm = BlockSpaceManager(8, num_gpu_blocks=4, num_cpu_blocks=0, watermark=0.0)
    group = make_group("r", prompt_len=16, num_seqs=1, block_size=8)
    allocate(bm, group)
    set_status(group, RUNNING)
    seq = group.seqs[0]
    assert bm.get_block_table(seq) == [0, 1]
    add_token(seq)  # token 17 starts the third block
    assert bm.num_blocks_to_grow(seq, 17) == 1
    assert append(bm, seq) is None
    assert bm.get_block_table(seq) == [0, 1, 2]
    assert bm.get_num_free_gpu_blocks() == 1
    for _ in range(7):  # tokens 18..24 fill it
        add_token(seq)
        assert append(bm, seq) is None
    assert bm.get_block_table(seq) == [0, 1, 2]
    add_token(seq)
    assert append(bm, seq) is None
    assert bm.get_block_table(seq) == [0, 1, 2, 3]
    assert bm.get_num_free_gpu_blocks() == 0
    for _ in range(8):
        add_token(seq)
    assert bm.num_blocks_to_grow(seq, seq.get_len()) == 1
    with pytest.raises(RuntimeError, match="out of GPU KV cache blocks"):
        bm.grow(seq, seq.get_len())
    assert bm.get_block_table(seq) == [0, 1, 2, 3]


def test_grow_covers_a_chunk_of_several_blocks():
    bm = BlockSpaceManager(8, num_gpu_blocks=8, num_cpu_blocks=0, watermark=0.0)
    seq = make_group("r", prompt_len=40, num_seqs=1, block_size=8).seqs[0]
    bm.allocate(seq, [], 10)  # the first chunk: 10 tokens
    assert bm.get_block_table(seq) == [0, 1]
    seq.num_computed_tokens = 10
    assert bm.num_blocks_to_grow(seq, 40) == 3
    assert bm.grow(seq, 40) is None
    assert bm.get_block_table(seq) == [0, 1, 2, 3, 4]


def test_copy_on_write_of_shared_last_block():
    bm = BlockSpaceManager(8, num_gpu_blocks=6, num_cpu_blocks=0, watermark=0.0)
    group = make_group("r", prompt_len=10, num_seqs=2, block_size=8)
    allocate(bm, group)
    set_status(group, RUNNING)
    a, b = group.seqs
    assert bm.get_block_table(a) == bm.get_block_table(b) == [0, 1]
    add_token(a)
    assert append(bm, a) == (1, 2)
    assert bm.get_block_table(a) == [0, 2]
    assert bm.get_block_table(b) == [0, 1]
    assert ref_counts(bm, a) == [2, 1]
    assert ref_counts(bm, b) == [2, 1]
    assert bm.get_num_free_gpu_blocks() == 3
    # b now owns block 1 alone: it writes in place.
    add_token(b)
    assert append(bm, b) is None
    assert bm.get_block_table(b) == [0, 1]
    assert bm.get_num_free_gpu_blocks() == 3


def test_shared_full_last_block_needs_no_copy():
    bm = BlockSpaceManager(8, num_gpu_blocks=6, num_cpu_blocks=0, watermark=0.0)
    group = make_group("r", prompt_len=8, num_seqs=2, block_size=8)
    allocate(bm, group)
    a, b = group.seqs
    add_token(a)
    add_token(b)
    assert append(bm, a) is None
    assert append(bm, b) is None
    assert bm.get_block_table(a) == [0, 1]
    assert bm.get_block_table(b) == [0, 2]
    assert ref_counts(bm, a) == [2, 1]


def test_fork_shares_every_block_then_copy_on_write():
    bm = BlockSpaceManager(16, num_gpu_blocks=8, num_cpu_blocks=0, watermark=0.0)
    group = make_group("r", prompt_len=20, num_seqs=1, block_size=16)
    allocate(bm, group)
    set_status(group, RUNNING)
    parent = group.seqs[0]
    child = parent.fork(1)
    group.add(child)
    bm.fork(parent, child)
    assert bm.get_block_table(child) == [0, 1]
    assert ref_counts(bm, parent) == [2, 2]
    assert bm.get_num_free_gpu_blocks() == 6
    with pytest.raises(ValueError, match="already has a block table"):
        bm.fork(parent, child)
    add_token(child)
    assert append(bm, child) == (1, 2)
    assert bm.get_block_table(child) == [0, 2]
    assert ref_counts(bm, parent) == [2, 1]
    bm.free(parent)
    assert ref_counts(bm, child) == [1, 1]
    assert bm.get_num_free_gpu_blocks() == 6


def test_swap_out_then_in_restores_tables_and_ref_counts():
    bm = BlockSpaceManager(8, num_gpu_blocks=10, num_cpu_blocks=6, watermark=0.0)
    group = make_group("r", prompt_len=20, num_seqs=2, block_size=8)
    allocate(bm, group)
    set_status(group, RUNNING)
    a, b = group.seqs
    add_token(a)
    add_token(b)
    assert append(bm, a) == (2, 3)
    assert append(bm, b) is None
    assert bm.get_block_table(a) == [0, 1, 3]
    assert bm.get_block_table(b) == [0, 1, 2]
    assert bm.get_num_free_gpu_blocks() == 6

    assert bm.can_swap_out(group)
    out = bm.swap_out(group)
    assert out == [(0, 0), (1, 1), (3, 2), (2, 3)]
    set_status(group, SWAPPED)
    assert bm.get_block_table(a) == [0, 1, 2]
    assert bm.get_block_table(b) == [0, 1, 3]
    assert ref_counts(bm, a) == [2, 2, 1]
    assert ref_counts(bm, b) == [2, 2, 1]
    assert all(blk.device is Device.CPU for blk in bm._block_tables[a.seq_id])
    assert bm.get_num_free_gpu_blocks() == 10
    assert bm.get_num_free_cpu_blocks() == 2
    with pytest.raises(ValueError, match="swapped out"):
        bm.grow(a, a.get_len() + 1)

    assert bm.can_swap_in(group)
    back = dict(bm.swap_in(group))
    set_status(group, RUNNING)
    assert sorted(back) == [0, 1, 2, 3]
    assert sorted(back.values()) == [0, 1, 2, 3]
    assert bm.get_block_table(a) == [back[0], back[1], back[2]]
    assert bm.get_block_table(b) == [back[0], back[1], back[3]]
    assert ref_counts(bm, a) == [2, 2, 1]
    assert ref_counts(bm, b) == [2, 2, 1]
    assert bm.get_num_free_gpu_blocks() == 6
    assert bm.get_num_free_cpu_blocks() == 6


def test_can_swap_out_needs_room_on_cpu():
    bm = BlockSpaceManager(8, num_gpu_blocks=10, num_cpu_blocks=2, watermark=0.0)
    group = make_group("r", prompt_len=17, num_seqs=2, block_size=8)
    allocate(bm, group)
    set_status(group, RUNNING)
    assert not bm.can_swap_out(group)
    with pytest.raises(RuntimeError, match="needs 3, 2 free"):
        bm.swap_out(group)
    assert bm.get_block_table(group.seqs[0]) == [0, 1, 2]
    assert bm.get_num_free_cpu_blocks() == 2


def test_can_swap_in_reserves_a_block_per_seq_and_the_watermark():
    bm = BlockSpaceManager(8, num_gpu_blocks=10, num_cpu_blocks=10, watermark=0.1)
    group = make_group("r", prompt_len=24, num_seqs=2, block_size=8)
    allocate(bm, group)
    set_status(group, RUNNING)
    bm.swap_out(group)
    set_status(group, SWAPPED)
    # 3 blocks + 1 per seq + watermark 1 = 6 free needed.
    filler = make_group("f", prompt_len=40, num_seqs=1, block_size=8, first_seq_id=10)
    allocate(bm, filler)
    assert bm.get_num_free_gpu_blocks() == 5
    assert not bm.can_swap_in(group)
    bm.free(filler.seqs[0])
    filler = make_group("f", prompt_len=32, num_seqs=1, block_size=8, first_seq_id=10)
    allocate(bm, filler)
    assert bm.get_num_free_gpu_blocks() == 6
    assert bm.can_swap_in(group)


def test_free_releases_and_is_idempotent():
    bm = BlockSpaceManager(8, num_gpu_blocks=4, num_cpu_blocks=0, watermark=0.0)
    group = make_group("r", prompt_len=9, num_seqs=2, block_size=8)
    allocate(bm, group)
    a, b = group.seqs
    bm.free(a)
    assert bm.get_num_free_gpu_blocks() == 2
    assert ref_counts(bm, b) == [1, 1]
    bm.free(a)
    assert bm.get_num_free_gpu_blocks() == 2
    bm.free(b)
    assert bm.get_num_free_gpu_blocks() == 4
    assert bm.gpu_usage() == 0.0
    with pytest.raises(KeyError, match="no block table"):
        bm.get_block_table(a)


def test_reset_frees_everything():
    bm = BlockSpaceManager(32, num_gpu_blocks=4, num_cpu_blocks=3, watermark=0.0)
    assert (bm.num_total_gpu_blocks, bm.num_total_cpu_blocks) == (4, 3)
    group = make_group("r", prompt_len=40, num_seqs=1, block_size=32)
    allocate(bm, group)
    set_status(group, RUNNING)
    bm.swap_out(group)
    assert bm.get_num_free_cpu_blocks() == 1
    bm.reset()
    assert bm.get_num_free_gpu_blocks() == 4
    assert bm.get_num_free_cpu_blocks() == 3
    assert not bm.has_block_table(group.seqs[0])


# Prefix caching


def test_block_hashes_chain_over_parent_and_namespace():
    a = hash_block(root_hash(""), [1, 2, 3])
    assert a == hash_block(root_hash(""), [1, 2, 3])
    assert a != hash_block(root_hash("adapter-1"), [1, 2, 3])
    assert a != hash_block(root_hash(""), [1, 2, 4])
    assert hash_block(a, [5]) != hash_block(hash_block(root_hash(""), [9, 9, 9]), [5])


def test_full_blocks_are_found_by_a_later_prompt_and_survive_their_holder():
    bm = BlockSpaceManager(8, num_gpu_blocks=8, num_cpu_blocks=0, watermark=0.0,
                           enable_prefix_caching=True)
    prompt = list(range(30))  # 3 full blocks and 6 tokens
    first = make_group("a", 30, 1, 8, prompt=prompt)
    allocate(bm, first)
    bm.cache_full_blocks(first.seqs[0])
    assert bm.num_cached_blocks() == 3
    bm.forget(first.seqs[0])
    # Freed, but cached: they count as free and come back on a hit.
    assert bm.get_num_free_gpu_blocks() == 8
    second = make_group("b", 0, 1, 8, first_seq_id=5, prompt=prompt[:24] + [99] * 9)
    hits = bm.find_cached_prefix(second.seqs[0])
    assert [b.block_number for b in hits] == [0, 1, 2]
    assert bm.can_allocate(second.seqs[0], hits, 33) is AllocStatus.OK
    bm.allocate(second.seqs[0], hits, 33)
    assert bm.get_block_table(second.seqs[0])[:3] == [0, 1, 2]
    assert ref_counts(bm, second.seqs[0]) == [1, 1, 1, 1, 1]
    assert bm.get_num_free_gpu_blocks() == 3
    bm.check_consistency()


def test_a_fully_cached_prompt_still_computes_its_last_block():
    bm = BlockSpaceManager(8, num_gpu_blocks=8, num_cpu_blocks=0, watermark=0.0,
                           enable_prefix_caching=True)
    prompt = list(range(16))
    first = make_group("a", 16, 1, 8, prompt=prompt)
    allocate(bm, first)
    bm.cache_full_blocks(first.seqs[0])
    again = make_group("b", 16, 1, 8, first_seq_id=3, prompt=prompt)
    assert len(bm.find_cached_prefix(again.seqs[0])) == 1


def test_cached_free_blocks_are_evicted_least_recently_freed_first():
    bm = BlockSpaceManager(8, num_gpu_blocks=4, num_cpu_blocks=0, watermark=0.0,
                           enable_prefix_caching=True)
    a = make_group("a", 16, 1, 8, prompt=[1] * 16)
    b = make_group("b", 16, 1, 8, first_seq_id=1, prompt=[2] * 16)
    for g in (a, b):
        allocate(bm, g)
        bm.cache_full_blocks(g.seqs[0])
    bm.forget(a.seqs[0])  # blocks 1 then 0 freed (tail first)
    bm.forget(b.seqs[0])  # then 3, 2
    assert bm.num_cached_blocks() == 4
    c = make_group("c", 8, 1, 8, first_seq_id=2, prompt=[3] * 8)
    bm.allocate(c.seqs[0], [], 8)
    assert bm.get_block_table(c.seqs[0]) == [1]  # a's tail went first
    assert bm.num_cached_blocks() == 3
    # a's first block is still found; its second is gone.
    probe = make_group("d", 17, 1, 8, first_seq_id=4, prompt=[1] * 17)
    assert [blk.block_number for blk in bm.find_cached_prefix(probe.seqs[0])] == [0]
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks() == 0 and bm.find_cached_prefix(probe.seqs[0]) == []
    bm.check_consistency()


def test_watermark_counts_cached_hits_that_are_free():
    bm = BlockSpaceManager(8, num_gpu_blocks=4, num_cpu_blocks=0, watermark=0.0,
                           enable_prefix_caching=True)
    a = make_group("a", 24, 1, 8, prompt=list(range(24)))
    allocate(bm, a)
    bm.cache_full_blocks(a.seqs[0])
    bm.forget(a.seqs[0])
    b = make_group("b", 0, 1, 8, first_seq_id=1, prompt=list(range(16)) + [50] * 16)
    hits = bm.find_cached_prefix(b.seqs[0])
    assert len(hits) == 2
    # 2 revived hits + 2 new blocks = all 4.
    assert bm.can_allocate(b.seqs[0], hits, 32) is AllocStatus.OK
    c = make_group("c", 0, 1, 8, first_seq_id=2, prompt=list(range(16)) + [50] * 17)
    assert bm.can_allocate(c.seqs[0], bm.find_cached_prefix(c.seqs[0]), 33) is \
        AllocStatus.NEVER


def test_take_table_update_sends_appends_or_the_whole_table():
    bm = BlockSpaceManager(8, num_gpu_blocks=8, num_cpu_blocks=4, watermark=0.0)
    group = make_group("r", 10, 1, 8)
    seq = group.seqs[0]
    bm.allocate(seq, [], 10)
    assert bm.take_table_update(seq) == ([0, 1], [])
    assert bm.take_table_update(seq) == (None, [])
    seq.num_computed_tokens = 10
    bm.grow(seq, 20)
    assert bm.take_table_update(seq) == (None, [2])
    child = seq.fork(1)
    bm.fork(seq, child)
    child.num_computed_tokens = 20
    assert bm.take_table_update(child) == ([0, 1, 2], [])
    seq.num_computed_tokens = 20
    assert bm.grow(seq, 21) == (2, 3)
    assert bm.take_table_update(seq) == ([0, 1, 3], [])


# Property-based: random schedules against a simulated KV cache.


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler and cache engine would: allocate (with prefix-cache
    hits), decode, fork, swap, free; allocation evicts cached blocks when nothing else is free.

    Besides the bookkeeping invariants (no block both free and referenced, reference counts
    equal to holders, hash map consistent), a fake KV cache (one token id per slot) is updated
    with the copies the manager asks for, so every sequence must read back its own tokens and
    every cached block the tokens its hash was made from: this catches a shared block written
    without copy-on-write, a wrong swap mapping, and a wrong prefix hit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockSpaceManager | None = None
        self.groups: list[SequenceGroup] = []
        self.ids = itertools.count()
        self.cache: dict[tuple[Device, int], list[int | None]] = {}
        self.content: dict[bytes, list[int]] = {}
        self.bases = [[(7 * i + j) % 5 for j in range(400)] for i in range(3)]

    @initialize(block_size=st.sampled_from([8, 16, 32]), num_gpu_blocks=st.integers(4, 32),
                num_cpu_blocks=st.integers(0, 16),
                watermark=st.sampled_from([0.0, 0.01, 0.1, 0.25]), caching=st.booleans())
    def init(self, block_size, num_gpu_blocks, num_cpu_blocks, watermark, caching):
        self.bm = BlockSpaceManager(block_size, num_gpu_blocks, num_cpu_blocks, watermark,
                                    enable_prefix_caching=caching)
        for n, dev in ((num_gpu_blocks, Device.GPU), (num_cpu_blocks, Device.CPU)):
            for i in range(n):
                self.cache[dev, i] = [None] * block_size

    # Helpers.

    def table(self, seq: Sequence) -> list[PhysicalBlock]:
        return self.bm._block_tables[seq.seq_id]

    def write(self, seq: Sequence, pos: int) -> None:
        block = self.table(seq)[pos // self.bm.block_size]
        assert block.block_hash is None, "a cached block is written"
        self.cache[block.device, block.block_number][pos % self.bm.block_size] = \
            seq.get_token_ids()[pos]

    def compute(self, seq: Sequence, start: int) -> None:
        """The step writes tokens start.. of ``seq``; then its full blocks are cached."""
        for pos in range(start, seq.get_len()):
            self.write(seq, pos)
        seq.num_computed_tokens = seq.get_len()
        self.bm.cache_full_blocks(seq)
        tokens, bs = seq.get_token_ids(), self.bm.block_size
        for i, h in enumerate(self.bm._hashes.get(seq.seq_id, [])):
            self.content.setdefault(h, tokens[i * bs:(i + 1) * bs])

    def copy(self, src_dev: Device, dst_dev: Device, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:
            self.cache[dst_dev, dst] = list(self.cache[src_dev, src])

    @staticmethod
    def pick(data: st.DataObject, groups: list[SequenceGroup]) -> SequenceGroup | None:
        # Rules return early instead of using preconditions, which make Hypothesis discard
        # many runs that start with no group.
        return data.draw(st.sampled_from(groups), label="group") if groups else None

    def groups_with(self, status: SequenceStatus) -> list[SequenceGroup]:
        return [g for g in self.groups if g.num_seqs(status) == len(g.seqs)]

    # Rules.

    @rule(data=st.data(), num_seqs=st.integers(1, 3))
    def add_request(self, data, num_seqs):
        bs = self.bm.block_size
        # Mostly prompts that fit; one in five may be too long to ever fit. Prompts are prefixes
        # of three base texts, so later ones often find earlier ones' blocks in the cache.
        max_len = 40 * bs if data.draw(st.integers(0, 4), label="long") == 0 else 6 * bs
        prompt_len = data.draw(st.integers(1, min(max_len, 400)), label="prompt_len")
        base = self.bases[data.draw(st.integers(0, 2), label="base")]
        group = make_group(f"r{next(self.ids)}", prompt_len, num_seqs, bs,
                           first_seq_id=next(self.ids) * 10, prompt=base[:prompt_len])
        seq = group.seqs[0]
        hits = self.bm.find_cached_prefix(seq)
        if hits:
            event("prefix hit")
            assert len(hits) * bs < prompt_len
            for i, block in enumerate(hits):
                assert self.cache[Device.GPU, block.block_number] == base[i * bs:(i + 1) * bs]
        needed = self.bm.blocks_for(prompt_len)
        revived = sum(1 for b in hits if b.ref_count == 0)
        total, free, wm = (self.bm.num_total_gpu_blocks, self.bm.get_num_free_gpu_blocks(),
                           self.bm.watermark_blocks)
        expected = (AllocStatus.NEVER if needed > total - wm
                    else AllocStatus.LATER if free - revived - (needed - len(hits)) < wm
                    else AllocStatus.OK)
        status = self.bm.can_allocate(seq, hits, prompt_len)
        assert status is expected
        event(f"can_allocate {status.name}")
        if status is not AllocStatus.OK:
            return
        self.bm.allocate(seq, hits, prompt_len)
        self.compute(seq, len(hits) * bs)
        for other in group.seqs[1:]:
            self.bm.fork(seq, other)
            other.num_computed_tokens = seq.num_computed_tokens
        set_status(group, RUNNING)
        self.groups.append(group)

    @rule(prompt_len=st.integers(1, 200))
    def allocate_unchecked(self, prompt_len):
        """allocate without can_allocate: succeeds if the blocks are free, else changes nothing."""
        group = make_group(f"u{next(self.ids)}", prompt_len, 1, self.bm.block_size,
                           first_seq_id=next(self.ids) * 10)
        seq = group.seqs[0]
        free = self.bm.get_num_free_gpu_blocks()
        if seq.num_blocks_needed > free:
            event("allocate out of blocks")
            with pytest.raises(RuntimeError):
                self.bm.allocate(seq, [], prompt_len)
            assert self.bm.get_num_free_gpu_blocks() == free
            assert not self.bm.has_block_table(seq)
            return
        self.bm.allocate(seq, [], prompt_len)
        self.compute(seq, 0)
        set_status(group, RUNNING)
        self.groups.append(group)

    @rule(data=st.data(), steps=st.integers(1, 10))
    def decode(self, data, steps):
        group = self.pick(data, self.groups_with(RUNNING))
        if group is None:
            return
        for _ in range(steps):
            needed = sum(self.bm.num_blocks_to_grow(seq, seq.get_len() + 1)
                         for seq in group.seqs)
            if needed > self.bm.get_num_free_gpu_blocks():
                event("cannot grow")
                return
            free_before = self.bm.get_num_free_gpu_blocks()
            # One source block can be copied to several sequences in one step.
            copies: list[tuple[int, int]] = []
            for seq in group.seqs:
                add_token(seq, next(self.ids) % 5)
                old_table = list(self.table(seq))
                # What grow takes is exactly what num_blocks_to_grow says (the scheduler skips
                # grow when that is 0).
                need = self.bm.num_blocks_to_grow(seq, seq.get_len())
                free_before_seq = self.bm.get_num_free_gpu_blocks()
                pair = self.bm.grow(seq, seq.get_len())
                table = self.table(seq)
                assert free_before_seq - self.bm.get_num_free_gpu_blocks() == need
                if need == 0:
                    assert pair is None and table == old_table
                assert len(table) == seq.num_blocks_needed
                if pair is not None:
                    src, dst = pair
                    assert len(table) == len(old_table)
                    assert old_table[-1].block_number == src and table[-1].block_number == dst
                    assert old_table[-1].ref_count >= 1  # still held by another sequence
                    assert table[-1].ref_count == 1
                    assert table[:-1] == old_table[:-1]
                    copies.append(pair)
                    event("copy-on-write")
                else:
                    assert table[:len(old_table)] == old_table
            assert self.bm.get_num_free_gpu_blocks() >= free_before - needed
            # The engine copies first, then the step writes the new tokens.
            self.copy(Device.GPU, Device.GPU, copies)
            for seq in group.seqs:
                self.compute(seq, seq.get_len() - 1)

    @rule(data=st.data())
    def fork(self, data):
        group = self.pick(data, self.groups_with(RUNNING))
        if group is None:
            return
        if len(group.seqs) >= 5:
            return
        parent = data.draw(st.sampled_from(group.seqs), label="parent")
        child = parent.fork(next(self.ids) * 10 + 1)
        self.bm.fork(parent, child)
        assert self.bm.get_block_table(child) == self.bm.get_block_table(parent)
        group.add(child)

    @rule(data=st.data())
    def swap_out(self, data):
        group = self.pick(data, self.groups_with(RUNNING))
        if group is None:
            return
        if not self.bm.can_swap_out(group):
            event("can_swap_out False")
            return
        event("swap out")
        lens = {seq.seq_id: len(self.table(seq)) for seq in group.seqs}
        pairs = self.bm.swap_out(group)
        assert len(pairs) == len({dst for _, dst in pairs})
        self.copy(Device.GPU, Device.CPU, pairs)
        set_status(group, SWAPPED)
        assert lens == {seq.seq_id: len(self.table(seq)) for seq in group.seqs}

    @rule(data=st.data(), checked=st.booleans())
    def swap_in(self, data, checked):
        group = self.pick(data, self.groups_with(SWAPPED))
        if group is None:
            return
        if checked and not self.bm.can_swap_in(group):
            event("can_swap_in False")
            return
        num_blocks = len({id(b) for seq in group.seqs for b in self.table(seq)})
        free = self.bm.get_num_free_gpu_blocks()
        if num_blocks > free:
            event("swap_in out of blocks")
            with pytest.raises(RuntimeError):
                self.bm.swap_in(group)
            assert self.bm.get_num_free_gpu_blocks() == free
            return
        pairs = self.bm.swap_in(group)
        event("swap in")
        assert len(pairs) == num_blocks
        self.copy(Device.CPU, Device.GPU, pairs)
        set_status(group, RUNNING)

    @rule(data=st.data())
    def free_seq(self, data):
        group = self.pick(data, self.groups)
        if group is None:
            return
        seq = data.draw(st.sampled_from(group.seqs), label="seq")
        self.bm.forget(seq)
        self.bm.free(seq)  # a second free is a no-op
        group.remove(seq.seq_id)
        if not group.seqs:
            self.groups.remove(group)

    # Invariants.

    def live_seqs(self) -> list[Sequence]:
        return [seq for group in self.groups for seq in group.seqs]

    @invariant()
    def tables_match_live_seqs(self):
        if self.bm is None:
            return
        assert set(self.bm._block_tables) == {seq.seq_id for seq in self.live_seqs()}

    @invariant()
    def blocks_are_conserved_ref_counted_and_hashed_consistently(self):
        if self.bm is None:
            return
        for table in self.bm._block_tables.values():
            assert len({id(b) for b in table}) == len(table)
        self.bm.check_consistency()
        for alloc in (self.bm._gpu_allocator, self.bm._cpu_allocator):
            in_use = [b for b in alloc._blocks if b.ref_count > 0]
            assert alloc.get_num_free_blocks() + len(in_use) == alloc.num_blocks
            for block in alloc._blocks:
                assert block.device is alloc.device
        assert all(b.block_hash is None for b in self.bm._cpu_allocator._blocks)

    @invariant()
    def cached_blocks_hold_the_tokens_of_their_hash(self):
        if self.bm is None:
            return
        for block in self.bm._gpu_allocator._blocks:
            if block.block_hash is not None:
                assert self.cache[Device.GPU, block.block_number] == \
                    self.content[block.block_hash]

    @invariant()
    def tables_live_on_the_right_device_and_read_back(self):
        if self.bm is None:
            return
        for seq in self.live_seqs():
            table = self.table(seq)
            device = Device.GPU if seq.status is RUNNING else Device.CPU
            assert all(block.device is device for block in table)
            assert len(table) == seq.num_blocks_needed
            slots = [tok for block in table for tok in self.cache[device, block.block_number]]
            assert slots[:seq.get_len()] == seq.get_token_ids()

    def teardown(self):
        if self.bm is None:
            return
        for seq in self.live_seqs():
            self.bm.forget(seq)
        assert self.bm.get_num_free_gpu_blocks() == self.bm.num_total_gpu_blocks
        assert self.bm.get_num_free_cpu_blocks() == self.bm.num_total_cpu_blocks
        assert all(b.ref_count == 0 for b in self.bm._gpu_allocator._blocks)
        assert all(b.ref_count == 0 for b in self.bm._cpu_allocator._blocks)
        self.bm.check_consistency()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerMachine = BlockManagerMachine.TestCase


@pytest.mark.parametrize(("tokens", "max_len", "want"), [
    (2048, 256, [256] * 8), (2048, 4096, [2048]), (1000, 300, [300, 300, 300, 100]),
    (5, 1, [1] * 5)])
def test_memory_profile_never_passes_max_model_len(tokens: int, max_len: int,
                                                   want: list[int]) -> None:
    """The profile step that sizes the GPU cache is made of sequences the model accepts
    (a single 2048-token sequence overran a 256-position model's rotary table)."""
    from cacheflow_runtime.model_executor.worker import profile_sequence_lengths

    assert profile_sequence_lengths(tokens, max_len) == want


def test_num_tokens_growable_counts_the_last_block_and_the_free_ones():
    bm = BlockSpaceManager(8, num_gpu_blocks=10, num_cpu_blocks=4, watermark=0.0)
    group = make_group("r", prompt_len=20, num_seqs=2, block_size=8)
    first, second = group.seqs
    bm.allocate(first, [], 13)  # 2 blocks, 3 slots left in the second
    first.num_computed_tokens = 13
    assert bm.get_num_free_gpu_blocks() == 8
    assert bm.num_tokens_growable(first) == 3 + 8 * 8
    assert bm.num_blocks_to_grow(first, 13 + bm.num_tokens_growable(first)) == 8
    bm.fork(first, second)  # the shared second block must be copied before a write
    second.num_computed_tokens = 13
    assert bm.num_tokens_growable(second) == 3 + 7 * 8
    filler = make_group("f", prompt_len=64, num_seqs=1, block_size=8, first_seq_id=10)
    allocate(bm, filler)
    assert bm.get_num_free_gpu_blocks() == 0
    # Both share the partly written block: neither can write into it without a free block.
    assert bm.num_tokens_growable(first) == bm.num_tokens_growable(second) == 0
    bm.free(second)  # ... and once the other one is gone, its 3 slots are the first's again
    assert bm.num_tokens_growable(first) == 3
