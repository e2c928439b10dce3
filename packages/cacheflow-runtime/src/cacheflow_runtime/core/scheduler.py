"""The scheduler: one token budget per step, chunked prefill, preemption, prefix caching.

Each step (``schedule``) builds one batch within ``max_num_batched_tokens`` tokens and
``max_num_seqs`` sequences, first come first served:

1. the running requests' decode tokens (one per running sequence);
2. chunks of prompts already partly computed;
3. requests swapped out earlier (only if nothing was preempted in this step);
4. new requests (only if nothing is swapped out and nothing was preempted), whose prompt starts
   after its longest prefix found in the prefix cache.

A prompt longer than what is left of the budget is split: it takes what is left, or half of it
when other prompts wait behind it, so that none waits behind a long prompt for more than one
step. With ``enable_chunked_prefill=False`` a step runs whole prompts only, or decodes only.

When the KV cache cannot hold what a running request needs, the latest-arrived request that is
not already in the batch is preempted: by recompute (its blocks are freed, the prefix cache
keeps what it can, and it goes back to the front of the waiting queue) or by swap (its blocks
move to host memory). Requests with several live sequences are always swapped, since their
sequences share blocks that recompute would duplicate.

``update_from_output`` applies a step's results: computed-token counts, prefix-cache blocks,
sampled tokens (parallel sampling forks, beam search) and the token stop rules. Only this
module changes request statuses and block tables.

Asynchronous scheduling: ``schedule_ahead(plan)`` builds the next step while ``plan`` still
runs. It first assumes ``plan``'s results: computed-token counts advance and every sequence
``plan`` samples gets a placeholder token (core/step_data.py), so lengths, slots, budgets and
copy-on-write work as usual; ``update_from_output(plan, ...)`` later puts the real tokens in
the placeholders' place and applies the stop rules. A sequence that finished meanwhile has its
token of the step ahead dropped, so every output is what the synchronous order gives. A step
whose schedule needs the tokens first is not scheduled ahead (``_assumable``, ``_fits``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Optional

from cacheflow_runtime.config import SchedulerConfig
from cacheflow_runtime.core.beam_search import beam_step
from cacheflow_runtime.core.block_manager import AllocStatus, BlockSpaceManager
from cacheflow_runtime.core.step_data import (
    CachedDecodes,
    ModelRunnerOutput,
    NewRequestData,
    ScheduledRequest,
    ScheduledSequence,
    SchedulerOutput,
    decodes_by_columns,
)
from cacheflow_runtime.core.stop import StopRule, hides_stop_token, token_stop
from cacheflow_runtime.sampling_metadata import GroupSampleResult, SampleResult
from cacheflow_runtime.sequence import FINISHED_STATUSES, Sequence, SequenceGroup, SequenceStatus


@dataclass
class _Budget:
    """What is left of a step's token and sequence budgets."""

    tokens: int
    seqs: int


_RUNNING = SequenceStatus.RUNNING
# The token counts of a one-sequence decode (shared: never mutated).
_ONE_TOKEN = (1,)


@dataclass
class _Plan:
    """The batch being built, in scheduling order: per group its scheduled sequences and the
    tokens of each (in the same order). ``preempted_ids``: the requests preempted in this
    step."""

    groups: list[tuple[SequenceGroup, list[Sequence], Seq[int]]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    preempted_ids: set[str] = field(default_factory=set)
    copies: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)

    @property
    def preempted(self) -> bool:
        """True once a request was preempted in this step."""
        return bool(self.preempted_ids)

    def add(self, group: SequenceGroup, seqs: list[Sequence], counts: Seq[int]) -> None:
        """Adds ``group``'s ``seqs`` with ``counts[i]`` tokens of ``seqs[i]`` to the batch."""
        self.groups.append((group, seqs, counts))
        self.ids.add(group.request_id)


def _is_decode(group: SequenceGroup) -> bool:
    """Every RUNNING (or SWAPPED) sequence of ``group`` has exactly one token to compute."""
    found = False
    for seq in group.seqs:
        if seq.is_finished():
            continue
        if seq.get_len() - seq.num_computed_tokens != 1:
            return False
        found = True
    return found


def _end_aborted_beam_search(group: SequenceGroup, live: list[Sequence]) -> None:
    """Ends an aborted beam search: its output is the beams it was extending (all "abort"),
    best cumulative logprob first, and it is finished (hypotheses found before are dropped)."""
    ranked = sorted(live, key=lambda seq: seq.cumulative_logprob, reverse=True)
    group.beam_hypotheses = [(seq.cumulative_logprob, seq) for seq in ranked]
    group.seqs = ranked
    group.beam_search_done = True


class Scheduler:
    """Decides, each step, which requests run and how many of their tokens."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockSpaceManager,
                 eos_token_ids: frozenset[int] = frozenset(),
                 primary_eos_token_id: Optional[int] = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        # The EOS that stops with no stop reason (the others report their id, as vLLM's do).
        self.primary_eos_token_id = primary_eos_token_id
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._next_seq_id = 0
        self._finished_req_ids: list[str] = []
        self._freed_seq_ids: list[int] = []
        # Asynchronous scheduling: the step whose results were assumed by schedule_ahead, and
        # the requests whose token in it is known to be their last (not scheduled again).
        self._assumed: Optional[SchedulerOutput] = None
        self._finishing: set[str] = set()

    # ---------------------------------------------------------------------------- requests
    def add_seq_group(self, seq_group: SequenceGroup) -> None:
        """Queues a new request (one WAITING sequence)."""
        self._stop_rule(seq_group)
        seq_group.decodes_by_columns = decodes_by_columns(seq_group.sampling_params)
        self.waiting.append(seq_group)

    def _stop_rule(self, group: SequenceGroup) -> StopRule:
        """``group``'s token stop rules in their per-token form (made once per request)."""
        rule = group.stop_rule
        if rule is None:
            rule = group.stop_rule = StopRule(group.sampling_params, len(group.prompt_token_ids),
                                              self.eos_token_ids, self.config.max_model_len)
        return rule

    def new_seq_id(self) -> int:
        """A sequence id not used before."""
        self._next_seq_id += 1
        return self._next_seq_id - 1

    def abort(self, request_ids: Iterable[str]) -> list[SequenceGroup]:
        """Finishes the given requests as aborted, frees their blocks and returns them."""
        wanted = set(request_ids)
        aborted: list[SequenceGroup] = []
        for queue in (self.waiting, self.running, self.swapped):
            for group in [g for g in queue if g.request_id in wanted]:
                queue.remove(group)
                live = [seq for seq in group.get_seqs() if not seq.is_finished()]
                for seq in live:
                    seq.status = SequenceStatus.FINISHED_ABORTED
                self._release(group)
                if group.sampling_params.use_beam_search:
                    _end_aborted_beam_search(group, live)
                aborted.append(group)
        return aborted

    def has_unfinished(self) -> bool:
        """True while any request is waiting, running or swapped."""
        return bool(self.waiting or self.running or self.swapped)

    def num_unfinished(self) -> int:
        """Number of requests waiting, running or swapped."""
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def finish_seq(self, seq: Sequence, status: SequenceStatus,
                   stop_reason: Optional[int | str] = None) -> None:
        """Ends ``seq`` (a stop string found by the output processor) and frees its blocks."""
        seq.status = status
        seq.stop_reason = stop_reason
        self.block_manager.forget(seq)

    def free_finished(self) -> list[SequenceGroup]:
        """Drops finished requests from the running queue and returns them."""
        done: list[SequenceGroup] = []
        keep: list[SequenceGroup] = []
        for group in self.running:
            (done if group.is_finished() else keep).append(group)
        if done:
            self.running = keep
            for group in done:
                self._release(group)
        return done

    def _release(self, group: SequenceGroup) -> None:
        for seq in group.get_seqs():
            self.block_manager.forget(seq)
            if seq.known_to_worker:
                self._freed_seq_ids.append(seq.seq_id)
                seq.known_to_worker = False
        if group.sent_to_worker:
            self._finished_req_ids.append(group.request_id)
            group.sent_to_worker = False

    # ------------------------------------------------------------------------- scheduling
    def schedule(self) -> SchedulerOutput:
        """Chooses this step's batch and returns it as plain data for the worker."""
        # The sequence budget limits only swapped and waiting requests. Those are scheduled
        # only if they were queued when the step began (a preemption in this step stops both),
        # so the running sequences are counted only then.
        free_seqs = (self.config.max_num_seqs - self._num_running_seqs()
                     if self.waiting or self.swapped else 0)
        budget = _Budget(self.config.max_num_batched_tokens, free_seqs)
        plan = _Plan()
        if not self.config.enable_chunked_prefill:
            if self.waiting and not self.swapped:
                self._admit_waiting(plan, budget)
            if not plan.groups:
                self._schedule_running(plan, budget)
                if not plan.preempted:
                    self._swap_in(plan, budget)
        else:
            self._schedule_running(plan, budget)
            if not plan.preempted:
                self._swap_in(plan, budget)
                if not self.swapped:
                    self._admit_waiting(plan, budget)
        return self._emit(plan)

    def _num_running_seqs(self) -> int:
        return sum(g.max_num_running_seqs() for g in self.running
                   if g.request_id not in self._finishing)

    def _chunk(self, remaining: int, budget: _Budget, others_wait: bool) -> int:
        """Tokens of a prompt with ``remaining`` tokens to compute that this step takes."""
        if remaining <= budget.tokens:
            return remaining
        if not self.config.enable_chunked_prefill or budget.tokens <= 0:
            return 0
        return max(1, budget.tokens // 2) if others_wait else budget.tokens

    def _schedule_running(self, plan: _Plan, budget: _Budget) -> None:
        # Decodes first, then prompt chunks, each in queue order. A group is classified when
        # its turn comes: what the groups before it do changes no other group but the victims
        # they preempt, which are skipped.
        finishing = self._finishing
        preempted_ids = plan.preempted_ids
        prefills: list[SequenceGroup] = []
        for group in list(self.running):  # a copy: preemption removes from the queue
            request_id = group.request_id
            if request_id in finishing or request_id in preempted_ids:
                continue
            group_seqs = group.seqs
            if len(group_seqs) == 1:  # the common case, without the generic bookkeeping
                seq = group_seqs[0]
                if (seq.status is _RUNNING and len(seq.prompt_token_ids)
                        + len(seq.output_token_ids) - seq.num_computed_tokens == 1):
                    if budget.tokens >= 1:
                        self._take_decode(group, seq, plan, budget)
                    continue
            if not _is_decode(group):
                prefills.append(group)
                continue
            seqs = group.get_seqs(SequenceStatus.RUNNING)
            if budget.tokens < len(seqs):
                continue
            counts = [1] * len(seqs)
            if self._make_room(group, seqs, counts, plan):
                self._take(group, seqs, counts, plan, budget)
        for i, group in enumerate(prefills):
            if group.request_id in preempted_ids:  # a victim earlier in this step
                continue
            seqs = group.get_seqs(SequenceStatus.RUNNING)
            others = i + 1 < len(prefills) or bool(self.waiting)
            n = self._chunk(seqs[0].get_len() - seqs[0].num_computed_tokens, budget, others)
            if n == 0:
                continue
            if self._make_room(group, seqs, [n], plan):
                self._take(group, seqs, [n], plan, budget)

    def _take_decode(self, group: SequenceGroup, seq: Sequence, plan: _Plan,
                     budget: _Budget) -> None:
        """``_make_room`` and ``_take`` for a group whose one sequence decodes one token; the
        block manager is asked only how many blocks it needs, nothing when that is none."""
        bm = self.block_manager
        end = seq.num_computed_tokens + 1
        need = bm.num_blocks_to_grow(seq, end)
        if need:
            if (need > bm.get_num_free_gpu_blocks()
                    and not self._make_room(group, [seq], _ONE_TOKEN, plan)):
                return
            cow = bm.grow(seq, end)
            if cow is not None:
                plan.copies.append(cow)
        bm.cache_full_blocks(seq, group.cache_namespace, end)
        budget.tokens -= 1
        plan.groups.append((group, [seq], _ONE_TOKEN))  # plan.add
        plan.ids.add(group.request_id)

    def _make_room(self, group: SequenceGroup, seqs: list[Sequence], counts: Seq[int],
                   plan: _Plan) -> bool:
        """Preempts the latest-arrived requests outside the batch until ``group``'s sequences
        can grow by ``counts`` tokens; returns False if ``group`` itself had to give way
        (preempted, or a prompt chunk deferred while the batch already holds other work)."""
        bm = self.block_manager
        while sum(bm.num_blocks_to_grow(s, s.num_computed_tokens + n)
                  for s, n in zip(seqs, counts)) > bm.get_num_free_gpu_blocks():
            victims = [g for g in self.running if g is not group and g.request_id not in plan.ids]
            if victims:
                self._preempt(victims[-1], plan)
            elif not _is_decode(group) and plan.groups:
                return False
            else:
                self._preempt(group, plan)
                return False
        return True

    def _take(self, group: SequenceGroup, seqs: list[Sequence], counts: Seq[int],
              plan: _Plan, budget: _Budget) -> None:
        for seq, n in zip(seqs, counts):
            end = seq.num_computed_tokens + n
            cow = self.block_manager.grow(seq, end)
            if cow is not None:
                plan.copies.append(cow)
            self.block_manager.cache_full_blocks(seq, group.cache_namespace, end)
        budget.tokens -= sum(counts)
        plan.add(group, seqs, counts)

    def _swap_in(self, plan: _Plan, budget: _Budget) -> None:
        while self.swapped:
            group = self.swapped[0]
            if group.max_num_running_seqs() > budget.seqs:
                break
            if not self.block_manager.can_swap_in(group):
                break
            self.swapped.popleft()
            plan.swap_in.extend(self.block_manager.swap_in(group))
            seqs = group.get_seqs(SequenceStatus.SWAPPED)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            budget.seqs -= group.max_num_running_seqs()
            if _is_decode(group):
                counts = [1] * len(seqs)  # can_swap_in kept a block per sequence for this
            else:
                # A prompt swapped out between chunks: its next chunk takes at most what the free
                # blocks hold (the rest waits for the next step, where _make_room may preempt).
                n = self._chunk(seqs[0].get_len() - seqs[0].num_computed_tokens, budget,
                                len(self.swapped) > 0 or bool(self.waiting))
                n = min(n, self.block_manager.num_tokens_growable(seqs[0]))
                counts = [n] if n else []
            if counts and sum(counts) <= budget.tokens:
                self._take(group, seqs, counts, plan, budget)

    def _admit_waiting(self, plan: _Plan, budget: _Budget) -> None:
        bm = self.block_manager
        while self.waiting and budget.tokens > 0:
            group = self.waiting[0]
            if group.max_num_running_seqs() > budget.seqs:
                break
            (seq,) = group.get_seqs(SequenceStatus.WAITING)
            skip_cache = group.sampling_params.prompt_logprobs is not None
            cached = [] if skip_cache else bm.find_cached_prefix(seq, group.cache_namespace)
            num_cached = len(cached) * bm.block_size
            n = self._chunk(seq.get_len() - num_cached, budget, len(self.waiting) > 1)
            if n == 0:
                break
            status = bm.can_allocate(seq, cached, num_cached + n)
            if status == AllocStatus.LATER:
                break
            if status == AllocStatus.NEVER:
                # add_request rejects these; reaching here means the cache shrank under it.
                raise RuntimeError(f"request {group.request_id} can never fit in the KV cache")
            self.waiting.popleft()
            bm.allocate(seq, cached, num_cached + n)
            bm.cache_full_blocks(seq, group.cache_namespace, num_cached + n)
            if not skip_cache:
                bm.record_prefix_query(seq.get_len(), num_cached)
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            if group.num_cached_tokens is None:
                group.num_cached_tokens = num_cached
            self.running.append(group)
            budget.seqs -= group.max_num_running_seqs()
            budget.tokens -= n
            plan.add(group, [seq], [n])

    def _preempt(self, group: SequenceGroup, plan: _Plan) -> None:
        plan.preempted_ids.add(group.request_id)
        self.num_preemptions += 1
        self.running.remove(group)
        seqs = group.get_seqs(SequenceStatus.RUNNING)
        if self.config.preemption_mode == "recompute" and len(seqs) == 1:
            for seq in seqs:
                seq.status = SequenceStatus.WAITING
                seq.num_computed_tokens = 0
                self.block_manager.free(seq)
            self.waiting.appendleft(group)
            return
        if not self.block_manager.can_swap_out(group):
            raise RuntimeError(f"request {group.request_id} must be swapped out but the CPU swap "
                               "space is full; raise swap_space")
        plan.swap_out.extend(self.block_manager.swap_out(group))
        for seq in seqs:
            seq.status = SequenceStatus.SWAPPED
        self.swapped.append(group)

    # ------------------------------------------------------------------------------ output
    def _emit(self, plan: _Plan) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_req_ids,
                              freed_seq_ids=self._freed_seq_ids, blocks_to_swap_in=plan.swap_in,
                              blocks_to_swap_out=plan.swap_out, blocks_to_copy=plan.copies)
        self._finished_req_ids, self._freed_seq_ids = [], []
        preempted_ids = plan.preempted_ids
        scheduled = out.scheduled
        decodes = out.decodes
        take_table_update = self.block_manager.take_table_update
        for group, seqs, counts in plan.groups:
            if group.request_id in preempted_ids:  # after it was taken (cannot happen today)
                continue
            update = None
            if group.decodes_by_columns and counts[0] == 1 and len(group.seqs) == 1:
                seq = seqs[0]
                start = seq.num_computed_tokens
                outputs = seq.output_token_ids
                # A decode of a sequence the worker holds, its table only extended: one row.
                if (seq.known_to_worker and outputs
                        and start + 1 == len(seq.prompt_token_ids) + len(outputs)):
                    update = take_table_update(seq)
                    if update[0] is None:
                        if update[1]:
                            decodes.new_blocks.append((len(decodes.seq_ids), update[1]))
                        decodes.req_ids.append(group.request_id)
                        decodes.seq_ids.append(seq.seq_id)
                        decodes.token_ids.append(outputs[-1])
                        decodes.num_computed_tokens.append(start)
                        continue
            if not group.sent_to_worker:
                out.new_requests.append(NewRequestData(group.request_id, group.prompt_token_ids,
                                                       group.sampling_params))
                group.sent_to_worker = True
            if len(seqs) == 1:
                seq, n = seqs[0], counts[0]
                parts = [self._scheduled_seq(seq, n, update)]
                do_sample = seq.num_computed_tokens + n == seq.get_len()
                # group.is_prefill, without the call when the group is this one sequence
                first = not seq.output_token_ids if len(group.seqs) == 1 else group.is_prefill
            else:
                parts = [self._scheduled_seq(s, n) for s, n in zip(seqs, counts)]
                do_sample = all(s.num_computed_tokens + n == s.get_len()
                                for s, n in zip(seqs, counts))
                first = group.is_prefill
            # Positional: a dataclass __init__ called with keywords costs twice as much, and
            # this runs per request and step (fields: req_id, seqs, do_sample, is_first_sample).
            scheduled.append(ScheduledRequest(group.request_id, parts, do_sample, first))
        return out

    def _scheduled_seq(self, seq: Sequence, num_tokens: int,
                       update: Optional[tuple[Optional[list[int]], list[int]]] = None,
                       ) -> ScheduledSequence:
        """``seq``'s share of the step; ``update``: its table update if already taken."""
        start = seq.num_computed_tokens
        block_ids, new_block_ids = (self.block_manager.take_table_update(seq) if update is None
                                    else update)
        known = len(seq.output_logprobs)  # seq.num_known_outputs
        if seq.known_to_worker:
            output_token_ids = None
            new_output_token_ids = seq.output_token_ids[seq.num_outputs_sent:known]
        else:
            output_token_ids = seq.output_token_ids[:known]
            new_output_token_ids = []
            seq.known_to_worker = True
        seq.num_outputs_sent = known
        # Positional, in field order (see _emit): seq_id, token_ids, num_computed_tokens,
        # new_block_ids, block_ids, new_output_token_ids, output_token_ids, sample_index,
        # cumulative_logprob.
        return ScheduledSequence(seq.seq_id, seq.token_slice(start, start + num_tokens), start,
                                 new_block_ids, block_ids, new_output_token_ids,
                                 output_token_ids, seq.sample_index, seq.cumulative_logprob)

    # ------------------------------------------------------------- scheduling ahead
    def schedule_ahead(self, last: SchedulerOutput) -> Optional[SchedulerOutput]:
        """Schedules the step after ``last`` while ``last`` still runs, assuming its results
        (see the module docstring); None when the next step must wait for them (nothing is
        scheduled then, and ``update_from_output(last, ...)`` applies them as usual)."""
        # Blocks freed while ``last`` runs (a request finished by its step-k token or aborted,
        # whose token in ``last`` is dropped) may go to another request in the step after:
        # every step's device work (swaps, copy-on-write, KV writes, attention) is queued on one
        # stream in the order the steps start, so ``last`` is done with such a block before the
        # next step copies into it, writes it or reads it. What ``last`` writes there lies past
        # anything cached (blocks holding a placeholder are not hashed, and a dropped step's
        # results are not applied), and past what the new holder reads before writing it.
        # Copy-on-write sources are read after the step before wrote them. Swaps never meet a
        # step in flight: a step scheduled ahead neither preempts nor runs beside swapped
        # requests, and swaps are scheduled only when no step is in flight.
        if not (last.scheduled or last.decodes.req_ids) or self.swapped:
            return None
        running = {g.request_id: g for g in self.running}
        if not self._assumable(last, running):
            return None
        self._assume(last, running)
        if not self._fits() or not (self.waiting or any(
                g.request_id not in self._finishing for g in self.running)):
            return None
        preemptions = self.num_preemptions
        plan = self.schedule()
        assert self.num_preemptions == preemptions, "a step scheduled ahead preempted a request"
        return plan

    def _assumable(self, last: SchedulerOutput, running: dict[str, SequenceGroup]) -> bool:
        """Whether the step after ``last`` can be built before ``last``'s tokens are known:
        every request ``last`` samples for draws its next token without them. Not so for beam
        search and a first sample that forks (their sequences depend on the tokens), for
        penalties (they count the tokens), for ``bad_words`` (they match the last tokens) and
        for ``min_tokens`` masking not yet over (the worker would count one token short).
        ``running``: the running requests by id."""
        for req in last.scheduled:
            group = running.get(req.req_id)
            if group is None or not req.do_sample:
                continue
            params = group.sampling_params
            if (params.use_beam_search or (req.is_first_sample and params.best_of > 1)
                    or params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                    or params.presence_penalty != 0.0 or params.bad_words):
                return False
            if params.min_tokens and any(seq.get_output_len() < params.min_tokens
                                         for seq in group.get_unfinished_seqs()):
                return False
        return True

    def _assume(self, last: SchedulerOutput, running: dict[str, SequenceGroup]) -> None:
        """Applies what is known of ``last``'s results before they arrive: computed tokens, and
        a placeholder for each token it samples. A request whose placeholders all end their
        sequences by length is not scheduled again."""
        self._assumed = last
        finishing = self._finishing
        advance = self._advance_decode
        for req_id in last.decodes.req_ids:
            group = running.get(req_id)
            if group is None:
                continue
            seq = group.seqs[0]
            advance(group, seq)
            if seq.status in FINISHED_STATUSES:
                continue
            seq.append_placeholder()
            # StopRule.length_capped
            rule = group.stop_rule or self._stop_rule(group)
            if len(seq.output_token_ids) >= rule.max_output_len:
                finishing.add(req_id)
        for req in last.scheduled:
            group = running.get(req.req_id)
            if group is None:
                continue
            seqs = self._advance(group, req)
            if not req.do_sample:
                continue
            max_output_len = (group.stop_rule or self._stop_rule(group)).max_output_len
            last_token = True
            for seq in seqs:
                if seq.status in FINISHED_STATUSES:
                    continue
                seq.append_placeholder()
                # StopRule.length_capped
                last_token = last_token and len(seq.output_token_ids) >= max_output_len
            if last_token:
                finishing.add(group.request_id)

    def _fits(self) -> bool:
        """Whether every running sequence can grow as far as the next step could take it
        without a preemption (a preemption would have to wait for the running step's tokens:
        a request preempted by recompute would be recomputed without them)."""
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        free = bm.get_num_free_gpu_blocks()
        # A sequence growing by t tokens takes at most ceil(t / block_size) new blocks and one
        # copy-on-write, and a step grows at most max_num_seqs sequences by budget tokens.
        if free >= bm.blocks_for(budget) + 2 * self.config.max_num_seqs:
            return True
        need = 0
        for group in self.running:
            if group.request_id in self._finishing:
                continue
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                end = min(seq.get_len(), seq.num_computed_tokens + budget)
                need += bm.num_blocks_to_grow(seq, end)
        return need <= free

    # ------------------------------------------------------------------ results of a step
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[SequenceGroup]:
        """Applies a step's results and returns the requests that got new tokens or prompt
        logprobs, in scheduling order. Token stop rules are applied here; stop strings are the
        output processor's (it calls :meth:`finish_seq`)."""
        now = time.monotonic()
        assumed = scheduler_output is self._assumed
        if assumed:
            self._assumed = None
            self._finishing.clear()
        touched: list[SequenceGroup] = []
        running = {g.request_id: g for g in self.running}
        prompt_logprobs = runner_output.prompt_logprobs
        samples = runner_output.samples
        decodes = scheduler_output.decodes
        if decodes.req_ids:
            self._apply_decodes(decodes, runner_output, running, assumed, touched)
        for req in scheduler_output.scheduled:
            group = running.get(req.req_id)
            if group is None:
                continue
            if not assumed:
                self._advance(group, req)
            share = prompt_logprobs.get(req.req_id) if prompt_logprobs else None
            if share is not None:
                group.prompt_logprobs = (group.prompt_logprobs or []) + share
            result = samples.get(req.req_id)
            if req.do_sample and result is not None:
                self._apply_samples(group, result, req.is_first_sample, now)
                touched.append(group)
            elif share is not None:
                touched.append(group)
        return touched

    def _advance_decode(self, group: SequenceGroup, seq: Sequence) -> None:
        """``_advance`` for a row of the step's columnar decodes: one computed token."""
        seq.num_computed_tokens += 1
        self.block_manager.cache_full_blocks(seq, group.cache_namespace)

    def _apply_decodes(self, decodes: CachedDecodes, runner_output: ModelRunnerOutput,
                       running: dict[str, SequenceGroup], assumed: bool,
                       touched: list[SequenceGroup]) -> None:
        """``update_from_output`` for the step's columnar decodes: each row's computed token
        and sampled token (appended to ``touched`` in row order)."""
        token_ids, logprobs = runner_output.decode_token_ids, runner_output.decode_logprobs
        if len(token_ids) != len(decodes.req_ids) or len(logprobs) != len(token_ids):
            raise RuntimeError(f"the step had {len(decodes.req_ids)} columnar decodes but the "
                               f"worker returned {len(token_ids)} tokens and {len(logprobs)} "
                               "logprobs for them")
        advance = self._advance_decode
        num_generated = 0
        for req_id, token_id, logprob in zip(decodes.req_ids, token_ids, logprobs):
            group = running.get(req_id)
            if group is None:
                continue
            seq = group.seqs[0]
            if not assumed:
                advance(group, seq)
            touched.append(group)
            if seq.status in FINISHED_STATUSES:  # ended while a step ahead ran: drop its token
                continue
            num_generated += 1
            output_len = seq.add_sample(token_id, logprob, {token_id: logprob})
            rule = group.stop_rule or self._stop_rule(group)
            # rule.may_stop(token_id, output_len)
            if output_len >= rule.max_output_len or token_id in rule.token_ids:
                self._check_token_stop(group, seq)
        self.num_generation_tokens += num_generated

    def _advance(self, group: SequenceGroup, req: ScheduledRequest) -> list[Sequence]:
        """Counts the step's computed tokens of ``req`` and caches the blocks they fill;
        returns its sequences."""
        cache_full_blocks = self.block_manager.cache_full_blocks
        group_seqs = group.seqs
        seqs = []
        for s in req.seqs:
            seq_id = s.seq_id
            if len(group_seqs) == 1 and group_seqs[0].seq_id == seq_id:
                seq = group_seqs[0]
            else:
                seq = group.find(seq_id)
            seq.num_computed_tokens += len(s.token_ids)
            cache_full_blocks(seq, group.cache_namespace)
            seqs.append(seq)
        return seqs

    def _apply_samples(self, group: SequenceGroup, result: GroupSampleResult, first: bool,
                       now: float) -> None:
        if first:
            group.first_token_time = now
            self.num_prompt_tokens += len(group.prompt_token_ids)
        if group.sampling_params.use_beam_search:
            self.num_generation_tokens += group.num_seqs(SequenceStatus.RUNNING)
            self._apply_beams(group, result.samples)
            return
        if first and len(result.samples) > 1:
            self.num_generation_tokens += len(result.samples)
            parent = group.get_seqs(SequenceStatus.RUNNING)[0]
            for index in range(1, len(result.samples)):
                child = parent.fork(self.new_seq_id(), sample_index=index)
                self.block_manager.fork(parent, child)
                group.add(child)
            for seq, sample in zip(group.get_seqs(SequenceStatus.RUNNING), result.samples):
                seq.append_token(sample.token_id, sample.logprobs)
                self._check_token_stop(group, seq)
            return
        rule = group.stop_rule or self._stop_rule(group)
        group_seqs = group.seqs
        for sample in result.samples:
            seq_id = sample.parent_seq_id
            if len(group_seqs) == 1 and group_seqs[0].seq_id == seq_id:
                seq = group_seqs[0]
            else:
                seq = group.find(seq_id)
            if seq.status in FINISHED_STATUSES:  # ended while a step ahead ran: drop its token
                continue
            self.num_generation_tokens += 1
            token_id = sample.token_id
            logprobs = sample.logprobs
            if rule.may_stop(token_id, seq.add_sample(token_id, logprobs[token_id], logprobs)):
                self._check_token_stop(group, seq)

    def _check_token_stop(self, group: SequenceGroup, seq: Sequence) -> None:
        stop = token_stop(group.sampling_params, seq.get_last_token_id(), seq.get_output_len(),
                          seq.get_len(), self.eos_token_ids, self.config.max_model_len,
                          self.primary_eos_token_id)
        if stop is not None:
            status, reason = stop
            seq.stop_token_hidden = hides_stop_token(group.sampling_params, status)
            self.finish_seq(seq, status, reason)

    def _apply_beams(self, group: SequenceGroup, candidates: list[SampleResult]) -> None:
        params = group.sampling_params
        parents = {seq.seq_id: seq for seq in group.get_seqs(SequenceStatus.RUNNING)}

        def ends(cand: SampleResult) -> Optional[tuple[SequenceStatus, Optional[int]]]:
            parent = parents[cand.parent_seq_id]
            return token_stop(params, cand.token_id, parent.get_output_len() + 1,
                              parent.get_len() + 1, self.eos_token_ids,
                              self.config.max_model_len, self.primary_eos_token_id)

        stops = [ends(c) for c in candidates]
        step = beam_step(group, candidates, [s is not None for s in stops],
                         {sid: seq.get_output_len() for sid, seq in parents.items()})
        stop_of = {id(c): s for c, s in zip(candidates, stops)}
        for score, cand in step.finished:
            hyp = parents[cand.parent_seq_id].fork(-1)
            hyp.append_token(cand.token_id, cand.logprobs)
            status, reason = stop_of[id(cand)] or (SequenceStatus.FINISHED_LENGTH_CAPPED, None)
            hyp.status, hyp.stop_reason = status, reason
            hyp.stop_token_hidden = hides_stop_token(params, status)
            group.beam_hypotheses.append((score, hyp))
        group.beam_hypotheses.sort(key=lambda item: item[0], reverse=True)
        del group.beam_hypotheses[params.best_of:]
        if step.done:
            group.beam_search_done = True
            for seq in parents.values():
                self.finish_seq(seq, SequenceStatus.FINISHED_LENGTH_CAPPED)
            self._release(group)
            group.seqs = [seq for _, seq in group.beam_hypotheses]
            return
        self._advance_beams(group, parents, step.running)

    def _advance_beams(self, group: SequenceGroup, parents: dict[int, Sequence],
                       running: list[SampleResult]) -> None:
        chosen: dict[int, list[SampleResult]] = {}
        for cand in running:
            chosen.setdefault(cand.parent_seq_id, []).append(cand)
        extended: list[tuple[Sequence, SampleResult]] = []
        for parent_id, parent in parents.items():
            picks = chosen.get(parent_id, [])
            if not picks:
                self.finish_seq(parent, SequenceStatus.FINISHED_ABORTED)
                if parent.known_to_worker:
                    self._freed_seq_ids.append(parent.seq_id)
                group.remove(parent_id)
                continue
            for cand in picks[1:]:
                child = parent.fork(self.new_seq_id())
                self.block_manager.fork(parent, child)
                group.add(child)
                extended.append((child, cand))
            extended.append((parent, picks[0]))
        for seq, cand in extended:
            seq.append_token(cand.token_id, cand.logprobs)
            seq.cumulative_logprob = cand.cumulative_logprob
