"""FCFS continuous batching with preemption by recompute or by swap."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from cacheflow_runtime.config import SchedulerConfig
from cacheflow_runtime.core.block_manager import AllocStatus, BlockSpaceManager
from cacheflow_runtime.sequence import SequenceGroup, SequenceStatus


@dataclass
class SchedulerOutputs:
    """What one engine step runs and which KV blocks move first.

    A step is either a prefill step (only new or recomputed prompts) or a decode step.
    """

    scheduled: list[SequenceGroup]
    is_prefill: bool
    num_batched_tokens: int
    blocks_to_swap_in: dict[int, int] = field(default_factory=dict)
    blocks_to_swap_out: dict[int, int] = field(default_factory=dict)
    blocks_to_copy: dict[int, list[int]] = field(default_factory=dict)
    preempted: int = 0

    def is_empty(self) -> bool:
        """True when nothing runs and no block moves."""
        return not (self.scheduled or self.blocks_to_swap_in or self.blocks_to_swap_out
                    or self.blocks_to_copy)


class Scheduler:
    """Decides, each step, which requests run, within a token and a sequence budget.

    Requests are served first come, first served. When the KV cache cannot grow every running
    sequence by one token, the latest-arrived running request is preempted: by recompute (its
    blocks are freed and it goes back to the front of the waiting queue) or by swap (its blocks
    move to host memory). Requests with several live sequences are always swapped, since their
    sequences share blocks that recompute would duplicate. Swapped requests come back before any
    new request is admitted.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockSpaceManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = 0

    def add_seq_group(self, seq_group: SequenceGroup) -> None:
        """Queues a new request."""
        self.waiting.append(seq_group)

    def abort(self, request_ids: Iterable[str]) -> list[SequenceGroup]:
        """Finishes the given requests as aborted, frees their blocks and returns them."""
        wanted = set(request_ids)
        aborted: list[SequenceGroup] = []
        for queue in (self.waiting, self.running, self.swapped):
            for group in [g for g in queue if g.request_id in wanted]:
                queue.remove(group)
                for seq in group.get_seqs():
                    if not seq.is_finished():
                        seq.status = SequenceStatus.FINISHED_ABORTED
                    self.block_manager.free(seq)
                aborted.append(group)
        return aborted

    def has_unfinished(self) -> bool:
        """True while any request is waiting, running or swapped."""
        return bool(self.waiting or self.running or self.swapped)

    def num_unfinished(self) -> int:
        """Number of requests waiting, running or swapped."""
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def free_finished(self) -> list[SequenceGroup]:
        """Drops finished requests from the running queue and returns them."""
        done = [g for g in self.running if g.is_finished()]
        self.running = [g for g in self.running if not g.is_finished()]
        return done

    def schedule(self) -> SchedulerOutputs:
        """Chooses this step's batch."""
        if not self.swapped:
            prefill = self._schedule_prefills()
            if prefill.scheduled:
                return prefill
        return self._schedule_decodes()

    def _num_running_seqs(self) -> int:
        return sum(g.max_num_running_seqs() for g in self.running)

    def _schedule_prefills(self) -> SchedulerOutputs:
        scheduled: list[SequenceGroup] = []
        num_tokens = 0
        num_seqs = self._num_running_seqs()
        while self.waiting:
            group = self.waiting[0]
            waiting_seqs = group.get_seqs(SequenceStatus.WAITING)
            new_tokens = sum(s.get_len() - s.num_computed_tokens for s in waiting_seqs)
            if num_tokens + new_tokens > self.config.max_num_batched_tokens:
                break
            if num_seqs + group.max_num_running_seqs() > self.config.max_num_seqs:
                break
            status = self.block_manager.can_allocate(group)
            if status == AllocStatus.LATER:
                break
            if status == AllocStatus.NEVER:
                # add_request rejects these; reaching here means the cache shrank under it.
                raise RuntimeError(f"request {group.request_id} can never fit in the KV cache")
            self.waiting.popleft()
            self.block_manager.allocate(group)
            for seq in waiting_seqs:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            scheduled.append(group)
            num_tokens += new_tokens
            num_seqs += group.max_num_running_seqs()
        return SchedulerOutputs(scheduled=scheduled, is_prefill=True, num_batched_tokens=num_tokens)

    def _schedule_decodes(self) -> SchedulerOutputs:
        out = SchedulerOutputs(scheduled=[], is_prefill=False, num_batched_tokens=0)
        queue = list(self.running)
        kept: list[SequenceGroup] = []
        while queue:
            group = queue.pop(0)
            while not self.block_manager.can_append_slots(group):
                if queue:
                    self._preempt(queue.pop(), out)
                else:
                    self._preempt(group, out)
                    break
            else:
                self._append_slots(group, out)
                kept.append(group)
        self.running = kept
        if not out.preempted:
            self._swap_in(out)
        out.scheduled = list(self.running)
        out.num_batched_tokens = sum(g.num_seqs(SequenceStatus.RUNNING) for g in self.running)
        return out

    def _swap_in(self, out: SchedulerOutputs) -> None:
        num_seqs = self._num_running_seqs()
        while self.swapped:
            group = self.swapped[0]
            if num_seqs + group.max_num_running_seqs() > self.config.max_num_seqs:
                break
            if not self.block_manager.can_swap_in(group):
                break
            self.swapped.popleft()
            out.blocks_to_swap_in.update(self.block_manager.swap_in(group))
            for seq in group.get_seqs(SequenceStatus.SWAPPED):
                seq.status = SequenceStatus.RUNNING
            self._append_slots(group, out)
            self.running.append(group)
            num_seqs += group.max_num_running_seqs()

    def _append_slots(self, group: SequenceGroup, out: SchedulerOutputs) -> None:
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            cow = self.block_manager.append_slot(seq)
            if cow is not None:
                src, dst = cow
                out.blocks_to_copy.setdefault(src, []).append(dst)

    def _preempt(self, group: SequenceGroup, out: SchedulerOutputs) -> None:
        out.preempted += 1
        self.num_preemptions += 1
        single = group.num_seqs(SequenceStatus.RUNNING) == 1
        if self.config.preemption_mode == "recompute" and single:
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                seq.status = SequenceStatus.WAITING
                seq.num_computed_tokens = 0
                self.block_manager.free(seq)
            self.waiting.appendleft(group)
            return
        if not self.block_manager.can_swap_out(group):
            raise RuntimeError(f"request {group.request_id} must be swapped out but the CPU swap "
                               "space is full; raise swap_space_gib")
        out.blocks_to_swap_out.update(self.block_manager.swap_out(group))
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            seq.status = SequenceStatus.SWAPPED
        self.swapped.append(group)
