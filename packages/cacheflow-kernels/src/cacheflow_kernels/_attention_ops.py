"""Attention over the paged KV cache: decode (one query token per sequence)."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from . import _checks as C
from ._lib import get_function

#: Head sizes paged_attention is compiled for.
PAGED_ATTENTION_HEAD_SIZES: tuple[int, ...] = (64, 80, 96, 112, 128, 256)
#: Cache block sizes paged_attention supports.
PAGED_ATTENTION_BLOCK_SIZES: tuple[int, ...] = (8, 16, 32)
#: Split-K partition sizes are multiples of this many tokens.
PARTITION_ALIGN = 64
#: The automatic split never makes partitions shorter than this (on an H100, 512-token partitions
#: beat 256 and 768 at batch 1 / 32k context with GQA-8: 36 against 43 us).
MIN_AUTO_PARTITION = 512
#: Upper bound of the number of partitions (the merge kernel keeps one weight per partition in
#: shared memory).
MAX_PARTITIONS = 8192
#: Query heads per CTA (the tensor-core kernel's rows; the float32 kernel uses 8).
_HEADS_PER_CTA = 16
#: ... of the pipelined kernel with two m16 row tiles per warp, for KV heads with more than 16
#: query heads and head sizes up to 128 where the grid is large enough (:func:`cta_heads`;
#: ``CACHEFLOW_PA_ROWS``, read at every call like the kernel reads it at every launch: "32" or
#: "16" forces one, anything else is the automatic choice).
_HEADS_PER_CTA_WIDE = 32
ROWS_ENV = "CACHEFLOW_PA_ROWS"
#: Environment variable choosing the automatic split plan: "wave" (default, see
#: :func:`plan_partitions`) or "fill" (the plan of 2026-12-03: as many partitions as fit one wave,
#: none shorter than MIN_AUTO_PARTITION). Read at every call, so one process can A/B them.
SPLIT_ENV = "CACHEFLOW_PA_SPLIT"
#: The wave planner's shortest partition.
MIN_WAVE_PARTITION = 256
#: ... where the split grid still has at most one CTA per SM (small grids: few sequences and KV
#: heads). An H100 survey (2026-12-06, docs/benchmarks.md) found 128-token partitions taking
#: 6-19% less time than 256 there: GQA-8 batch 1 at 4k 9.56 against 10.22 us (32 against 16
#: partitions) and at 2k 6.84 against 8.47, MQA batch 8 at 1k 8.51 against 9.52, head size 256
#: batch 1 at 1k 12.57 against 14.67.
MIN_ONE_WAVE_PARTITION = 128
#: Most partitions of a grid that has at least one CTA per SM unsplit. Such a grid is bound by
#: the device's total bandwidth, not by its busiest SM: a split only evens out the SMs that hold
#: one CTA more, for the merge and more CTA overheads. The same survey and the sweeps before it
#: measured splits of 3-11 partitions 2-23% slower than the better of none and two there (MQA
#: batch 72 at 4k 77.7 against 63.1 us unsplit; GQA-4 head size 64 batch 17 at 8k 107.0 in 11
#: against 103.7 in 2).
FULL_GRID_MAX_PARTITIONS = 2
#: Environment variable: "4" keeps the decode kernel's CTAs at 4 warps where an unsplit grid of at
#: most one CTA per SM would otherwise run wide CTAs (:func:`wide_ctas_allowed`; the kernel reads
#: it at every launch, the planner at every call).
WARPS_ENV = "CACHEFLOW_PA_WARPS"
#: Environment variable: the largest group (query heads per KV head) that runs wide CTAs, a
#: positive integer (default _WIDE_MAX_GROUP; the kernel reads it at every launch, the planner at
#: every call).
WIDE_GROUP_ENV = "CACHEFLOW_PA_WIDE_GROUP"
_WIDE_MAX_GROUP = 48  # kDefaultWideMaxGroup in paged_attention.cuh
#: Head sizes at which a wide CTA's ring of four two-tile stages fits an SM's shared memory with
#: a 16-bit cache (16 warps up to 96, 12 at 112 and 128; not 256).
_WIDE_HEAD_SIZES = (64, 80, 96, 112, 128)
# The wave planner's cost model, in units of one context token of one CTA (its K and V rows):
# fixed work of a CTA (query load, pipeline fill and drain, merge of its warps, output), and the
# merge kernel of a split (its launch and run, once per call). The CTA's is a design estimate;
# the merge's was 128 until a sweep of 25 short-context cases (contexts 512-2048, batches
# 1-64, MHA / GQA-4/8 / MQA; H100, 2026-12-06) found splits into 256-token partitions up to 32%
# slower than the unsplit launch (576 then). Split grids of fewer CTAs than
# _MERGE_FULL_CTAS_PER_SM per SM pay a share of it (:func:`merge_cost`); the three constants
# were fitted together on the H100 survey of 144 shapes (2026-12-07, docs/benchmarks.md).
_CTA_OVERHEAD_TOKENS = 64
_MERGE_FIXED_TOKENS = 512
_MERGE_FULL_CTAS_PER_SM = 2.0  # split CTAs per SM from which a merge costs all of it
_MERGE_MIN_SHARE = 0.5  # the least share of it a split of few CTAs pays
# CTAs per SM that saturate it in grids of one to two CTAs per SM (see :func:`plan_time`).
_PAIR_GRID_SATURATION = 2
# Wide unsplit grids covering at least 1 / this share of the SMs are costed at the full rate of
# their warps (see :func:`plan_time`): 32 CTAs on 132 SMs are, 16 are not.
_WIDE_FULL_RATE_SHARE = 5
# The plan memo: (grid CTAs, context in 64-token buckets, SMs, resident CTAs, CTA rows, wide) ->
# partitions, so a decode loop (max_context_len + 1 per step) evaluates the model once per bucket.
_WAVE_PLANS: dict[tuple[int, int, int, int, int, bool], int] = {}
_WAVE_PLANS_MAX = 4096

_QUERY = ("num_seqs", "num_heads", "head_size")
_CACHE = ("num_blocks", "block_size", "num_kv_heads", "head_size")

_sm_counts: dict[int, int] = {}


def _one_of(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values[:-1]) + f" or {values[-1]}"


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_scalars(
    op: str, scale: Any, max_context_len: Any, partition_size: Any, sliding_window: Any,
) -> None:
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) \
            or not math.isfinite(float(scale)):
        raise C.arg_error(op, "scale", "a finite real number", repr(scale))
    if max_context_len is not None and (not _is_int(max_context_len) or max_context_len < 0):
        raise C.arg_error(op, "max_context_len", "None or an int >= 0", repr(max_context_len))
    if partition_size is not None and (
        not _is_int(partition_size) or partition_size < 0 or partition_size % PARTITION_ALIGN
    ):
        raise C.arg_error(
            op, "partition_size",
            f"None (automatic), 0 (no split) or a positive multiple of {PARTITION_ALIGN}",
            repr(partition_size),
        )
    if sliding_window is not None and (not _is_int(sliding_window) or sliding_window < 1):
        raise C.arg_error(op, "sliding_window", "None or an int >= 1", repr(sliding_window))


def _validate_paged_attention(
    out: Any, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
    context_lens: Any, scale: Any, alibi_slopes: Any, max_context_len: Any, workspace: Any,
    partition_size: Any, sliding_window: Any, lse: Any = None, op: str = "paged_attention",
) -> None:
    # Shapes and dtypes.
    C.check_shape(op, "query", query, _QUERY, (None, None, None))
    C.check_dtype(op, "query", query, C.FLOAT_KV_DTYPES)
    num_seqs, num_heads, head_size = C.shape_of(query)
    if head_size not in PAGED_ATTENTION_HEAD_SIZES:
        raise C.arg_error(
            op, "query", f"of head_size {_one_of(PAGED_ATTENTION_HEAD_SIZES)}",
            f"head_size {head_size} (shape {list(C.shape_of(query))})",
        )
    C.check_shape(op, "out", out, _QUERY, (num_seqs, num_heads, head_size))
    C.check_same_dtype(op, "out", out, "query", query)
    C.check_shape(op, "key_cache", key_cache, _CACHE, (None, None, None, head_size))
    C.check_cache_dtype(op, "key_cache", key_cache, "query", query)
    num_blocks, block_size, num_kv_heads, _ = C.shape_of(key_cache)
    if block_size not in PAGED_ATTENTION_BLOCK_SIZES:
        raise C.arg_error(
            op, "key_cache", f"of block_size {_one_of(PAGED_ATTENTION_BLOCK_SIZES)}",
            f"block_size {block_size} (shape {list(C.shape_of(key_cache))})",
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise C.arg_error(
            op, "key_cache", f"of num_kv_heads dividing num_heads={num_heads}",
            f"num_kv_heads {num_kv_heads}",
        )
    C.check_shape(
        op, "value_cache", value_cache, _CACHE, (num_blocks, block_size, num_kv_heads, head_size)
    )
    C.check_same_dtype(op, "value_cache", value_cache, "key_cache", key_cache)
    C.check_shape(
        op, "block_tables", block_tables, ("num_seqs", "max_blocks_per_seq"), (num_seqs, None)
    )
    C.check_dtype(op, "block_tables", block_tables, ("int32",))
    C.check_shape(op, "context_lens", context_lens, ("num_seqs",), (num_seqs,))
    C.check_dtype(op, "context_lens", context_lens, ("int32",))
    if alibi_slopes is not None:
        C.check_shape(op, "alibi_slopes", alibi_slopes, ("num_heads",), (num_heads,))
        C.check_dtype(op, "alibi_slopes", alibi_slopes, ("float32",))
    if workspace is not None:
        C.check_shape(op, "workspace", workspace, ("num_elements",), (None,))
        C.check_dtype(op, "workspace", workspace, ("float32",))
    if lse is not None:
        C.check_shape(op, "lse", lse, ("num_seqs", "num_heads"), (num_seqs, num_heads))
        C.check_dtype(op, "lse", lse, ("float32",))
    # Scalars.
    _check_scalars(op, scale, max_context_len, partition_size, sliding_window)
    # Memory layout.
    tensors = {
        "out": out, "query": query, "key_cache": key_cache, "value_cache": value_cache,
        "block_tables": block_tables, "context_lens": context_lens,
        "alibi_slopes": alibi_slopes, "workspace": workspace, "lse": lse,
    }
    tensors = {name: x for name, x in tensors.items() if x is not None}
    for name, x in tensors.items():
        if name == "query":
            C.check_row_strided(op, name, x)  # its rows may be strided (a fused QKV output)
        else:
            C.check_contiguous(op, name, x)
    # Device last.
    C.check_cuda(op, "query", query)
    for name, x in tensors.items():
        if name != "query":
            C.check_same_device(op, name, x, "query", query)


# Tensor checks are remembered per signature (see _checks.CheckMemo) with the sizes derived
# from them; the scalars, which change from step to step (max_context_len), are checked on
# every call.
_CHECKS = C.CheckMemo()


def resident_ctas_per_sm(head_size: int, rows: int = _HEADS_PER_CTA) -> int:
    """CTAs of the fp16/bf16 decode kernel one multiprocessor holds at once (its register budget,
    ``MmaMinBlocks`` in paged_attention.cuh): 4 up to head size 96, 3 up to 128, else 2; with
    CTAs of 32 query heads (``rows=32``): 3 up to head size 64, else 2."""
    if rows > _HEADS_PER_CTA:
        return 3 if head_size <= 64 else 2
    return 4 if head_size <= 96 else 3 if head_size <= 128 else 2


def cta_heads(group: int, head_size: int, kv_rows: int, num_sms: int) -> int:
    """Query heads per CTA the decode kernel takes for ``group`` query heads per KV head and
    ``kv_rows`` (sequences x KV heads) on ``num_sms`` multiprocessors (the dispatch of
    paged_attention.cuh, ``WantsWideRows``): for groups above 16 at head sizes up to 128, 32
    where the unsplit grid of 32-head CTAs, ``kv_rows * ceil(group / 32)``, has at least one CTA
    per multiprocessor, else 16 (twice as many CTAs, so that each SM runs two); the environment
    variable ``CACHEFLOW_PA_ROWS`` set to "16" or "32" forces one. Other groups and head sizes
    take 16. (Where the kernel falls back to 16 anyway, e.g. a forced shallow ring, the plan is
    only less tuned, never wrong.)"""
    if group <= _HEADS_PER_CTA or head_size > 128:
        return _HEADS_PER_CTA
    forced = os.environ.get(ROWS_ENV)
    if forced in ("16", "32"):
        return int(forced)
    wide_ctas = kv_rows * -(-group // _HEADS_PER_CTA_WIDE)
    return _HEADS_PER_CTA_WIDE if wide_ctas >= num_sms else _HEADS_PER_CTA


def wide_ctas_allowed(head_size: int, group: int) -> bool:
    """Whether the decode kernel runs wide CTAs (``RunWideCtas`` in paged_attention.cuh: the warps
    of ``resident_ctas_per_sm`` CTAs of 4 warps in one CTA, one per SM) for unsplit grids of at
    most one CTA per SM: ``group`` (query heads per KV head) at most 48 (CTAs of 16 heads; a
    larger group takes ceil(group / 16)), head sizes up to 128, unless ``CACHEFLOW_PA_WARPS`` is
    "4"; ``CACHEFLOW_PA_WIDE_GROUP`` sets another largest group (:func:`wide_max_group`). (The
    kernel also takes them for FP8 caches at head size 256; where the two differ the plan is
    only less tuned, never wrong.)"""
    if os.environ.get(WARPS_ENV) == "4":
        return False
    return group <= wide_max_group() and head_size in _WIDE_HEAD_SIZES


def wide_max_group() -> int:
    """The largest group that runs wide CTAs: ``CACHEFLOW_PA_WIDE_GROUP`` where it is an integer
    from 1 to 1024 (``WideMaxGroup`` in paged_attention.cu), else 48."""
    value = os.environ.get(WIDE_GROUP_ENV, "").strip()
    if value.isdigit() and 0 < int(value) <= 1024:
        return int(value)
    return _WIDE_MAX_GROUP


def saturating_ctas_per_sm(resident: int, rows: int = _HEADS_PER_CTA) -> int:
    """CTAs per multiprocessor that the wave planner assumes saturate its share of the memory
    bandwidth, for ``resident`` resident CTAs of ``rows`` query heads: two thirds of them,
    rounded up (3 -> 2, 4 -> 3, 2 -> 2); one for CTAs of more than 16 heads. Fewer run
    latency-bound (each CTA at its own streaming rate). A design assumption from measurements:
    a 16-row CTA alone streams at about half an SM's share (H200, 2026-12-03), while a 32-row
    CTA, with twice the work per byte, gains nothing from a second one beside it (H200,
    2026-12-05, MQA d128: 128 vs 256 CTAs of one call 28.6 us both; 128 seqs x 1k tokens
    unsplit 25.0 us, in two partitions 34.8 us)."""
    if rows > _HEADS_PER_CTA:
        return 1
    return max(1, -(-2 * resident // 3))


def plan_time(ctas: int, parts: int, max_context_len: int, num_sms: int, resident: int,
              rows: int, wide: bool = False) -> float:
    """The wave planner's cost of cutting ``max_context_len`` into ``parts`` partitions, for a
    grid of ``ctas`` CTAs per partition on ``num_sms`` multiprocessors holding ``resident`` CTAs
    each, in units of one CTA token at the latency-bound rate (relative: only comparisons).

    Equal CTAs spread evenly: the busiest SM runs ``n = ceil(ctas * parts / num_sms)`` of them,
    ``resident`` at a time; while at least ``s = saturating_ctas_per_sm(resident, rows)`` run,
    the SM moves ``s`` CTAs' worth of tokens per unit, and a last group of fewer than ``s`` runs at
    ``s`` CTAs' time anyway (the wave tail). A CTA's work is its partition plus a fixed
    overhead, plus its share of the merge traffic when split (``rows`` partial rows of
    ``head_size + 2`` floats written and read again: about 2 * rows tokens of 16-bit K/V); a
    split adds the merge kernel once (:func:`merge_cost`).

    A grid of one to two CTAs per SM (``num_sms < ctas <= 2 * num_sms``) saturates each SM at
    two CTAs (``_PAIR_GRID_SATURATION``) whatever ``resident``: at head sizes up to 96 (4
    resident, 3 assumed to saturate elsewhere) its unsplit launch was 3-16% faster than the
    two-way splits the model chose otherwise (H100, 2026-12-06: GQA-4 / GQA-8 / MHA at d64, 256
    CTAs, 16-bit and FP8). Larger grids keep ``s``; no other regime has been measured.

    ``wide`` (:func:`wide_ctas_allowed`): an unsplit grid of at most one CTA per SM runs wide
    CTAs, each with the warps of ``resident`` CTAs, which moves its tokens at ``resident`` times a
    lone CTA's rate where the grid covers at least 1 / _WIDE_FULL_RATE_SHARE of the SMs, else at
    the saturated rate (``s`` times). The model has no term for the device's total bandwidth, so
    it cannot see that a split of a grid of a few CTAs gains by spreading it over many more SMs;
    the two rates stand in for that, fitted on an H100 sweep (2026-12-06): unsplit grids of 32-64
    wide CTAs at contexts of 2k-6k were 2-10% faster than the splits the saturated rate chose,
    grids of 4-16 CTAs 15-77% slower than their splits.
    """
    sat = saturating_ctas_per_sm(resident, rows)
    size = -(-max_context_len // parts)
    work = size + _CTA_OVERHEAD_TOKENS + (2 * rows if parts > 1 else 0)
    if wide and parts == 1 and ctas <= num_sms:
        return work / (resident if ctas * _WIDE_FULL_RATE_SHARE >= num_sms else sat)
    if num_sms < ctas <= 2 * num_sms:
        sat = min(sat, _PAIR_GRID_SATURATION)
    n = -(-ctas * parts // num_sms)
    full, rem = divmod(n, resident)
    units = full * resident + (max(rem, sat) if rem else 0)
    return units * work / sat + (merge_cost(ctas * parts, num_sms) if parts > 1 else 0)


def merge_cost(split_ctas: int, num_sms: int) -> float:
    """The wave planner's cost of a split's merge for a split grid of ``split_ctas`` CTAs:
    ``_MERGE_FIXED_TOKENS`` from ``_MERGE_FULL_CTAS_PER_SM`` CTAs per SM up, a share in
    proportion below, where the merge has few partial rows to combine and mostly hides under
    the main kernel's tail, but never less than ``_MERGE_MIN_SHARE`` of it (its launch and round
    trips remain).

    Fitted on an H100 survey (bench_split_plan.py, 144 shapes at 7-11 partition counts each,
    2026-12-06 and 07; docs/benchmarks.md): the planner's plan took 1.0078x the fastest
    measured one on average, worst 1.09x, against 1.0232x and 1.47x with the full cost from one
    CTA per SM (576 token-units). That cost kept small grids at short contexts whole where
    128-token partitions were 1.2-1.5x faster (GQA-8 at head size 64, batch 2 at 2k: 9.54 us
    whole, 6.82 in 16 x 128). The floor keeps grids of two to four wide CTAs at head size 64
    whole at 1k, as the measured grid of eight (5.46 us whole, 6.14 in 8 x 128)."""
    share = split_ctas / (_MERGE_FULL_CTAS_PER_SM * num_sms)
    return _MERGE_FIXED_TOKENS * max(_MERGE_MIN_SHARE, min(1.0, share))


def max_wave_partitions(ctas: int, max_context_len: int, num_sms: int) -> int:
    """The most partitions the wave planner considers for a grid of ``ctas`` CTAs per partition:
    partitions of at least MIN_WAVE_PARTITION tokens, or of MIN_ONE_WAVE_PARTITION where the
    split grid keeps at most one CTA per SM, and at most FULL_GRID_MAX_PARTITIONS where the
    unsplit grid already has one CTA per SM or more."""
    most = _longest_split(ctas, max_context_len, num_sms)
    return min(most, FULL_GRID_MAX_PARTITIONS) if ctas >= num_sms else most


def _longest_split(ctas: int, max_context_len: int, num_sms: int) -> int:
    """The most partitions their minimum lengths allow (see :func:`max_wave_partitions`)."""
    most = min(max_context_len // MIN_WAVE_PARTITION, MAX_PARTITIONS)
    return max(most, min(num_sms // ctas, max_context_len // MIN_ONE_WAVE_PARTITION))


def _wave_partitions(ctas: int, max_context_len: int, num_sms: int, resident: int,
                     rows: int, wide: bool = False) -> int:
    """The partition count minimizing :func:`plan_time` (fewest partitions among ties) up to
    :func:`max_wave_partitions`. For a given count n of CTAs on the busiest SM the most partitions
    that keep it are best (shorter CTAs), so only those counts (n = 1 .. 8 * resident) and the
    longest split the partitions' minimum lengths allow are tried, then those above
    :func:`max_wave_partitions` dropped (so a grid of more than 8 waves keeps its one
    partition, as before that limit)."""
    most = _longest_split(ctas, max_context_len, num_sms)
    if most <= 1:
        return 1
    candidates = {1, most}
    for n in range(1, 8 * resident + 1):
        parts = n * num_sms // ctas
        if parts >= most:
            break
        if parts > 1:
            candidates.add(parts)
    limit = max_wave_partitions(ctas, max_context_len, num_sms)
    candidates = {parts for parts in candidates if parts <= limit}
    best, best_time = 1, plan_time(ctas, 1, max_context_len, num_sms, resident, rows, wide)
    for parts in sorted(candidates - {1}):
        t = plan_time(ctas, parts, max_context_len, num_sms, resident, rows, wide)
        if t < best_time * (1 - 1e-9):
            best, best_time = parts, t
    return best


def plan_partitions(
    num_seqs: int, num_heads: int, num_kv_heads: int, max_context_len: int, num_sms: int,
    partition_size: int | None = None, *, head_size: int = 128, split: str | None = None,
    fused: bool = False,
) -> tuple[int, int]:
    """The split-K plan of :func:`paged_attention`: ``(partition_size, num_partitions)``.

    ``(0, 1)`` means no split: one CTA per (sequence, KV head, group of up to 16 or 32 query
    heads: :func:`cta_heads`)
    covers the whole context and writes ``out`` directly. Otherwise the context is cut into
    ``num_partitions = ceil(max_context_len / partition_size)`` partitions computed by separate
    CTAs, merged by a second kernel through the workspace. A given ``partition_size`` (a
    multiple of 64; 0 = no split) is used as is.

    Automatic choice (``partition_size=None``), by ``split`` (default: the environment variable
    ``CACHEFLOW_PA_SPLIT``, else ``"wave"``):

    - ``"wave"``: the partition count that minimizes :func:`plan_time`, a model of how the
      grid's CTAs fill the device's ``num_sms`` multiprocessors at
      ``resident_ctas_per_sm(head_size)`` CTAs each, waves and their tail included (e.g. 512
      CTAs on 132 SMs x 3 leave a tail of one CTA per SM that runs at a latency-bound rate for
      a third of the call: two partitions are cheaper), with a per-CTA overhead and the merge's
      cost; partitions of at least MIN_WAVE_PARTITION tokens (MIN_ONE_WAVE_PARTITION where the
      split grid keeps at most one CTA per SM), and at most FULL_GRID_MAX_PARTITIONS for grids
      of at least one CTA per SM (:func:`max_wave_partitions`). Where the kernel runs wide CTAs
      (:func:`wide_ctas_allowed`) for unsplit grids of at most one CTA per SM, that plan is
      costed as those (``wide`` in :func:`plan_time`).
    - ``"fill"`` (the plan of 2026-12-03): as many partitions as still fit the whole grid in one
      wave of resident CTAs, none shorter than MIN_AUTO_PARTITION tokens; no split when even two
      partitions would not fit.

    ``fused``: the plan of :func:`paged_attention_with_rotary_cache`, whose launches of groups
    of 17-32 query heads run 4-warp CTAs, never wide ones: planned as
    :func:`paged_attention` with ``CACHEFLOW_PA_WARPS=4``, so that the two give the same bits.

    Sizes are rounded up to a multiple of 64.
    """
    if partition_size is not None:
        if partition_size == 0:
            return 0, 1
        parts = -(-max_context_len // partition_size)
        return (partition_size, parts) if parts > 1 else (0, 1)
    group = num_heads // max(num_kv_heads, 1)
    num_sms = max(num_sms, 1)
    heads_per_cta = cta_heads(group, head_size, num_seqs * num_kv_heads, num_sms)
    ctas = num_seqs * num_kv_heads * -(-group // heads_per_cta)
    if ctas <= 0 or max_context_len <= 0:
        return 0, 1
    resident = resident_ctas_per_sm(head_size, heads_per_cta)
    mode = split if split is not None else os.environ.get(SPLIT_ENV) or "wave"
    if mode == "fill":
        parts = min(resident * num_sms // ctas, max_context_len // MIN_AUTO_PARTITION,
                    MAX_PARTITIONS)
    else:
        # One plan per 64-token bucket of the context, taken at the bucket's start (so no
        # partition is shorter than the planner's minimum).
        bucket = max_context_len // PARTITION_ALIGN
        rows = min(group, heads_per_cta)
        # Groups of 17-32 heads: costed as wide CTAs only on grids of at least a fifth of the
        # SMs, the ones measured (H100, 2026-12-07: MQA grids of 32-96 such CTAs unsplit took
        # 0.81-0.98x the time of the splits planned before); smaller grids keep those plans.
        wide = wide_ctas_allowed(head_size, group) and (
            group <= _HEADS_PER_CTA or (not fused and ctas * _WIDE_FULL_RATE_SHARE >= num_sms))
        key = (ctas, bucket, num_sms, resident, rows, wide)
        parts = _WAVE_PLANS.get(key, 0)
        if parts == 0:
            parts = _wave_partitions(ctas, bucket * PARTITION_ALIGN, num_sms, resident, rows,
                                     wide)
            if len(_WAVE_PLANS) >= _WAVE_PLANS_MAX:
                _WAVE_PLANS.clear()
            _WAVE_PLANS[key] = parts
    return split_of(max_context_len, parts)


def split_of(max_context_len: int, parts: int) -> tuple[int, int]:
    """``(partition_size, num_partitions)`` of cutting ``max_context_len`` into ``parts``
    partitions of a multiple of PARTITION_ALIGN tokens (the rounding can leave fewer); ``(0, 1)``
    when that is no split."""
    if parts <= 1:
        return 0, 1
    size = -(-max_context_len // parts)
    size = -(-size // PARTITION_ALIGN) * PARTITION_ALIGN
    parts = -(-max_context_len // size)
    return (size, parts) if parts > 1 else (0, 1)


def _sm_count(device_index: int) -> int:
    count = _sm_counts.get(device_index)
    if count is None:
        count = int(get_function("paged_attention_sm_count")(device_index))
        _sm_counts[device_index] = count
    return count


def paged_attention_workspace_size(
    num_seqs: int, num_heads: int, num_kv_heads: int, head_size: int, max_context_len: int,
    *, device: Any = None, num_sms: int | None = None, partition_size: int | None = None,
) -> int:
    """Number of float32 elements of the workspace :func:`paged_attention` needs; 0: none.

    ``num_seqs * num_heads * num_partitions * (head_size + 2)`` with ``num_partitions`` from
    :func:`plan_partitions`, which depends on the device's multiprocessor count: give
    ``num_sms``, or ``device`` (a CUDA device index, ``torch.device`` or ``"cuda:N"``; default
    0). Pass the same ``num_seqs``, ``max_context_len`` and ``partition_size`` as to
    :func:`paged_attention`. Without a device query, ``ceil(max_context_len / 128)`` bounds
    ``num_partitions`` for the automatic plan.
    """
    if num_sms is None:
        num_sms = _sm_count(_device_index(device))
    _, parts = plan_partitions(num_seqs, num_heads, num_kv_heads, max_context_len, num_sms,
                               partition_size, head_size=head_size)
    return 0 if parts <= 1 else num_seqs * num_heads * parts * (head_size + 2)


def _device_index(device: Any) -> int:
    """The CUDA device index of ``device``: None (0), an index, ``"cuda"`` (0) or ``"cuda:N"``,
    or a ``torch.device`` of type cuda (its index, 0 when it has none)."""
    if device is None:
        return 0
    if _is_int(device) and device >= 0:
        return int(device)
    # A string is tested before attributes: str has an ``index`` method.
    text = device if isinstance(device, str) else None
    if text is None and getattr(device, "type", None) == "cuda":
        index = getattr(device, "index", None)
        return 0 if index is None else int(index)
    kind, colon, number = (text or "").partition(":")
    if kind == "cuda" and (not colon or number.isdigit()):
        return int(number) if colon else 0
    raise ValueError(f"device must be a CUDA device (an index >= 0, 'cuda', 'cuda:N' or a "
                     f"torch.device of type cuda), got {device!r}")


def _call_shapes(query: Any, key_cache: Any, block_tables: Any,
                 workspace: Any) -> tuple[int, ...]:
    """What a decode call's checks remember (validated arguments): num_seqs, num_heads,
    head_size, block_size, num_kv_heads, max_blocks_per_seq, the workspace's length (-1: none)
    and the CUDA device index."""
    num_seqs, num_heads, head_size = C.shape_of(query)
    _, block_size, num_kv_heads, _ = C.shape_of(key_cache)
    max_blocks = C.shape_of(block_tables)[1]
    ws_len = -1 if workspace is None else C.shape_of(workspace)[0]
    device_index = C.device_of(query)[1] or 0
    return (num_seqs, num_heads, head_size, block_size, num_kv_heads, max_blocks, ws_len,
            device_index)


def _split_plan(op: str, query: Any, num_seqs: int, num_heads: int, num_kv_heads: int,
                head_size: int, max_ctx: int, device_index: int, partition_size: int | None,
                workspace: Any, ws_len: int, fused: bool = False) -> tuple[int, Any]:
    """The decode kernel's split plan for a call (``fused``: of the fused rotary launch, see
    :func:`plan_partitions`): ``(partition_size, workspace)``, the workspace allocated with
    torch when the plan splits and none was given (None when it does not split); a given one
    too small, or too many partitions, is a ValueError."""
    size, parts = plan_partitions(num_seqs, num_heads, num_kv_heads, max_ctx,
                                  _sm_count(device_index), partition_size, head_size=head_size,
                                  fused=fused)
    if parts > MAX_PARTITIONS:
        raise C.arg_error(
            op, "partition_size",
            f"large enough for at most {MAX_PARTITIONS} partitions of "
            f"max_context_len={max_ctx}", repr(partition_size),
        )
    if parts <= 1:
        return size, None
    need = num_seqs * num_heads * parts * (head_size + 2)
    if workspace is None:
        import torch  # deferred: only this path allocates

        device = query.device if type(query) is torch.Tensor else f"cuda:{device_index}"
        return size, torch.empty(need, dtype=torch.float32, device=device)
    if ws_len < need:
        raise C.arg_error(
            op, "workspace",
            f"at least {need} float32 elements (num_seqs * num_heads * num_partitions * "
            f"(head_size + 2) = {num_seqs} * {num_heads} * {parts} * {head_size + 2})",
            f"{ws_len} elements",
        )
    return size, workspace


def paged_attention(
    out: Any, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
    context_lens: Any, scale: float, alibi_slopes: Any = None,
    max_context_len: int | None = None, workspace: Any = None, *,
    partition_size: int | None = None, sliding_window: int | None = None,
    k_scale: Any = 1.0, v_scale: Any = 1.0, logits_soft_cap: float | None = None,
    lse: Any = None,
) -> None:
    """Decode attention over the paged KV cache: one query token per sequence, into ``out``.

    For each sequence ``s``, head ``h`` (KV head ``h // (num_heads // num_kv_heads)``) and the
    ``n = context_lens[s]`` cached tokens at positions ``j`` (token ``j`` is at
    ``key_cache[block_tables[s, j // block_size], j % block_size]``)::

        score[j] = scale * dot(query[s, h], K[j])
        score[j] = cap * tanh(score[j] / cap)                 # only with logits_soft_cap=cap
        score[j] += alibi_slopes[h] * (j - (n - 1))
        out[s, h] = softmax(score) @ V

    where ``K = key_cache * k_scale`` and ``V = value_cache * v_scale`` for FP8 caches.

    The query is the last context token (already written to the cache, e.g. by
    :func:`reshape_and_cache`). A sequence with ``context_lens[s] == 0`` gets zeros. MHA, GQA
    and MQA (``num_heads % num_kv_heads == 0``). Accumulation is in float32 (online softmax);
    float16/bfloat16 use tensor cores, with the probabilities rounded to the input dtype before
    they multiply V (as FlashAttention does).

    Args:
        out: ``[num_seqs, num_heads, head_size]``, dtype of ``query``; written.
        query: ``[num_seqs, num_heads, head_size]``, float16, bfloat16 or float32; head_size
            64, 80, 96, 112, 128 or 256. Its sequence rows may be strided (each row's
            ``[num_heads, head_size]`` contiguous, the row stride a multiple of 16 bytes), e.g.
            a view of a fused QKV projection output: no copy is needed.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_size]``, dtype of ``query``
            or an FP8 E4M3 cache (``torch.float8_e4m3fn``, or ``uint8`` holding its bytes);
            block_size 8, 16 or 32 (the layout of :func:`reshape_and_cache`).
        value_cache: same shape and dtype as ``key_cache``.
        block_tables: int32 ``[num_seqs, max_blocks_per_seq]``; entries past a sequence's
            context are never read; the others must be valid block numbers.
        context_lens: int32 ``[num_seqs]``, each at most ``max_blocks_per_seq * block_size``
            (larger values are clamped to it).
        scale: the softmax scale, usually ``head_size ** -0.5``.
        alibi_slopes: None or float32 ``[num_heads]``: ALiBi bias ``slope * (key_pos -
            query_pos)``.
        max_context_len: an upper bound of ``context_lens`` (host int). It sizes the split-K
            grid, so every ``context_lens`` entry must be ``<=`` it (a longer context would be
            cut off). Default: ``max_blocks_per_seq * block_size``, which is always safe but
            may split more than needed. Pass it for speed; it never needs a device sync.
        workspace: None or a float32 1-D tensor on the device with at least
            :func:`paged_attention_workspace_size` elements, i.e. ``num_seqs * num_heads *
            num_partitions * (head_size + 2)``; needed only when the context is split. None
            allocates it with torch (inside this call). Pass one to capture the call in a CUDA
            graph without allocating, with a fixed ``max_context_len``.
        partition_size: split-K partition length in tokens: None chooses (see
            :func:`plan_partitions`), 0 never splits, else a multiple of 64.
        sliding_window: None, or W >= 1: the query sees only the last W context tokens (its
            own included), as Mistral's sliding window.
        k_scale, v_scale: dequantization scales of FP8 caches (a float, or a 1-element tensor
            read once with ``.item()``); 1.0 for caches of ``query``'s dtype.
        logits_soft_cap: None, or ``cap > 0``: scores become ``cap * tanh(score / cap)``
            before ALiBi and the softmax (Gemma 2).
        lse: None or float32 ``[num_seqs, num_heads]``; written with ``log(sum(exp(score)))``
            over each row's final scores (``-inf`` for an empty context). With it, two
            attentions of one query over disjoint parts of its context merge exactly (e.g. a
            prefix shared by many sequences computed once, then each sequence's own tokens:
            cascade attention).

    All tensors are C-contiguous (``query``: see above) CUDA tensors on one device (torch, CuPy,
    JAX: any DLPack array); ``query``, ``out`` and the caches 16-byte aligned. The kernels run
    on the caller's current stream, without host synchronization, and can be captured in CUDA
    graphs: the grid depends only on the shapes, ``max_context_len`` and ``partition_size``;
    ``context_lens``, ``block_tables`` and ``query`` may change between replays.

    On sm_90 and newer the call is launched with programmatic dependent launch and starts
    before the previous kernel on the stream has finished: it reads ``block_tables``,
    ``context_lens`` and the cache at each sequence's positions ``0 .. n - 2`` already then,
    and everything else (the query, position ``n - 1``) after that kernel completes. So if the
    previous kernel is this package's :func:`reshape_and_cache`, it may write only each
    sequence's last position (the decode token's own K/V, as a decode step does). A kernel of
    another library never lets it start early, and this package's other early-releasing ops
    (norms, activations, rotary) write neither the cache nor the tables.

    Raises:
        ValueError: wrong device, dtype, shape, memory layout or value of an argument (checked
            before the kernel library is loaded), or a workspace that is too small.
        TypeError: a tensor argument is not a tensor.
        RuntimeError: the kernel library is missing or a launch failed.
    """
    def validate() -> tuple[int, ...]:
        _validate_paged_attention(
            out, query, key_cache, value_cache, block_tables, context_lens, scale, alibi_slopes,
            max_context_len, workspace, partition_size, sliding_window, lse,
        )
        return _call_shapes(query, key_cache, block_tables, workspace)

    info = _CHECKS.check(
        (out, query, key_cache, value_cache, block_tables, context_lens, alibi_slopes, workspace,
         lse),
        (), validate,
    )
    _check_scalars("paged_attention", scale, max_context_len, partition_size, sliding_window)
    fp8 = C.is_fp8_cache(key_cache)
    ks = C.scale_value("paged_attention", "k_scale", k_scale, fp8)
    vs = C.scale_value("paged_attention", "v_scale", v_scale, fp8)
    cap = C.soft_cap_value("paged_attention", logits_soft_cap)
    (num_seqs, num_heads, head_size, block_size, num_kv_heads, max_blocks, ws_len,
     device_index) = info
    max_tokens = max_blocks * block_size
    max_ctx = max_tokens if max_context_len is None else min(int(max_context_len), max_tokens)
    if num_seqs == 0 or num_heads == 0:
        return
    size, workspace = _split_plan(
        "paged_attention", query, num_seqs, num_heads, num_kv_heads, head_size, max_ctx,
        device_index, partition_size, workspace, ws_len)
    get_function("paged_attention")(
        out, query, C.as_kernel_cache(key_cache), C.as_kernel_cache(value_cache), block_tables,
        context_lens, float(scale), alibi_slopes, max_ctx, size, workspace,
        int(sliding_window or 0), ks, vs, cap, lse,
    )


_FUSED_CHECKS = C.CheckMemo()
_FUSED_OP = "paged_attention_with_rotary_cache"


def _validate_new_token(query: Any, key: Any, value: Any, key_cache: Any, positions: Any,
                        slot_mapping: Any, cos_sin_cache: Any) -> None:
    """The fused op's own arguments (the others: :func:`_validate_paged_attention`)."""
    op = _FUSED_OP
    C.check_dtype(op, "query", query, ("float16", "bfloat16"))
    num_seqs, _, head_size = C.shape_of(query)
    num_kv_heads = C.shape_of(key_cache)[2]
    for name, x in (("key", key), ("value", value)):
        C.check_shape(op, name, x, ("num_seqs", "num_kv_heads", "head_size"),
                      (num_seqs, num_kv_heads, head_size))
        C.check_same_dtype(op, name, x, "query", query)
        C.check_row_strided(op, name, x)
        C.check_same_device(op, name, x, "query", query)
    for name, x in (("positions", positions), ("slot_mapping", slot_mapping)):
        C.check_shape(op, name, x, ("num_seqs",), (num_seqs,))
        C.check_dtype(op, name, x, ("int64",))
        C.check_contiguous(op, name, x)
        C.check_same_device(op, name, x, "query", query)
    if cos_sin_cache is not None:
        C.check_shape(op, "cos_sin_cache", cos_sin_cache, ("max_position", "head_size"),
                      (None, head_size))
        C.check_dtype(op, "cos_sin_cache", cos_sin_cache, ("float32",))
        C.check_contiguous(op, "cos_sin_cache", cos_sin_cache)
        C.check_same_device(op, "cos_sin_cache", cos_sin_cache, "query", query)


def paged_attention_with_rotary_cache(
    out: Any, query: Any, key: Any, value: Any, key_cache: Any, value_cache: Any,
    block_tables: Any, context_lens: Any, positions: Any, slot_mapping: Any,
    cos_sin_cache: Any, is_neox: bool, scale: float, alibi_slopes: Any = None,
    max_context_len: int | None = None, workspace: Any = None, *,
    partition_size: int | None = None, sliding_window: int | None = None,
    k_scale: Any = 1.0, v_scale: Any = 1.0, logits_soft_cap: float | None = None,
) -> bool:
    """A decode step's rotary embedding, KV-cache write and attention in one kernel.

    The result is that of :func:`rotary_embedding_with_cache` (``query`` and ``key`` rotated at
    ``positions``, the rotated key and ``value`` stored at ``slot_mapping``) followed by
    :func:`paged_attention` of the rotated query, bit for bit, except that ``query`` and ``key``
    are not rotated in place: they are only read. The kernel of each (sequence, KV head) stores
    the new key and value before it reads that slot back, so the step saves the rotary kernel's
    launch and latency; with programmatic dependent launch the cache reads of the older positions
    start before the kernel that writes ``query`` / ``key`` / ``value`` has finished.

    Args:
        out: ``[num_seqs, num_heads, head_size]``, dtype of ``query``; written.
        query: ``[num_seqs, num_heads, head_size]`` float16 or bfloat16, before the rotary
            embedding; rows may be strided as :func:`paged_attention`'s.
        key, value: ``[num_seqs, num_kv_heads, head_size]``, dtype of ``query``: the step's new
            key (before the rotary embedding) and value, rows strided like ``query``'s (16-byte
            aligned, row stride a multiple of 8 elements), e.g. views of a fused QKV output.
        key_cache, value_cache, block_tables, context_lens, scale, alibi_slopes,
        max_context_len, workspace, partition_size, sliding_window, k_scale, v_scale,
        logits_soft_cap: as :func:`paged_attention` (a split launch too: the partition that
            holds the new position stores it); ``context_lens`` counts the new token, whose
            cache slot is ``slot_mapping[s]`` at context position ``context_lens[s] - 1``.
        positions: int64 ``[num_seqs]``: the new token's rotary position; outside
            ``[0, max_position)`` query and key stay unrotated.
        slot_mapping: int64 ``[num_seqs]``: the new token's cache slot (``block * block_size +
            offset``); negative or past the cache: nothing is stored (padding rows).
        cos_sin_cache: float32 ``[max_position, head_size]`` (cos | sin of every feature pair:
            full rotary, as :func:`rotary_embedding_with_cache`), or None: no rotation, only the
            cache write.
        is_neox: neox style (rotate halves) or gpt-j style (interleaved pairs).

    Returns:
        True when it ran. False, having done nothing, where the fused kernel does not apply: a
        KV head has more query heads than one CTA takes (over 32, or over 16 at head size 256),
        or the device's shared memory does not fit the pipelined kernel. The caller then runs
        :func:`rotary_embedding_with_cache` and :func:`paged_attention`.

    Raises:
        ValueError, TypeError, RuntimeError: as :func:`paged_attention`.
    """
    def validate() -> tuple[int, ...]:
        _validate_paged_attention(
            out, query, key_cache, value_cache, block_tables, context_lens, scale, alibi_slopes,
            max_context_len, workspace, partition_size, sliding_window, None, op=_FUSED_OP,
        )
        _validate_new_token(query, key, value, key_cache, positions, slot_mapping,
                            cos_sin_cache)
        return _call_shapes(query, key_cache, block_tables, workspace)

    info = _FUSED_CHECKS.check(
        (out, query, key, value, key_cache, value_cache, block_tables, context_lens, positions,
         slot_mapping, cos_sin_cache, alibi_slopes, workspace),
        (), validate,
    )
    _check_scalars(_FUSED_OP, scale, max_context_len, partition_size, sliding_window)
    if not isinstance(is_neox, bool):
        raise C.arg_error(_FUSED_OP, "is_neox", "a bool", repr(is_neox))
    fp8 = C.is_fp8_cache(key_cache)
    ks = C.scale_value(_FUSED_OP, "k_scale", k_scale, fp8)
    vs = C.scale_value(_FUSED_OP, "v_scale", v_scale, fp8)
    cap = C.soft_cap_value(_FUSED_OP, logits_soft_cap)
    (num_seqs, num_heads, head_size, block_size, num_kv_heads, max_blocks, ws_len,
     device_index) = info
    max_tokens = max_blocks * block_size
    max_ctx = max_tokens if max_context_len is None else min(int(max_context_len), max_tokens)
    if num_seqs == 0 or num_heads == 0:
        return True
    size, workspace = _split_plan(
        _FUSED_OP, query, num_seqs, num_heads, num_kv_heads, head_size, max_ctx, device_index,
        partition_size, workspace, ws_len, fused=True)
    return bool(get_function(_FUSED_OP)(
        out, query, key, value, C.as_kernel_cache(key_cache), C.as_kernel_cache(value_cache),
        block_tables, context_lens, positions, slot_mapping, cos_sin_cache, is_neox,
        float(scale), alibi_slopes, max_ctx, size, workspace, int(sliding_window or 0), ks, vs,
        cap,
    ))
