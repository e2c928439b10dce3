"""Which decode batch sizes get a CUDA graph, and how replays are counted (CPU: the rules
only; tests/test_gpu_engine.py captures and replays them on CUDA)."""

from __future__ import annotations

import pytest

from cacheflow_runtime.model_executor.cuda_graphs import (
    CONTEXT_STEP,
    SHORT_PARTITION,
    CudaGraphUsage,
    DecodeGraphs,
    capture_sizes,
    graph_batch_size,
    second_graph_context,
    short_context_limit,
)


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8, 100, 256, 257, 300, 512, 1000])
def test_every_batch_the_scheduler_forms_has_a_graph(max_num_seqs: int) -> None:
    sizes = capture_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
    for n in range(1, max_num_seqs + 1):
        size = graph_batch_size(n, sizes)
        assert size is not None and n <= size
        # at most 7 padding rows, or a quarter of the graph's rows
        assert size - n <= max(7, size // 4)
    assert graph_batch_size(max_num_seqs + 1, sizes) is None


def test_sizes_past_256_step_by_64() -> None:
    assert capture_sizes(512)[-5:] == [256, 320, 384, 448, 512]
    assert capture_sizes(300)[-2:] == [256, 300]


def test_usage_padding_fraction() -> None:
    assert CudaGraphUsage().padding_fraction == 0.0
    usage = CudaGraphUsage(graph_steps=3, graph_rows=21, padding_rows=3, eager_decode_steps=2)
    assert usage.padding_fraction == 0.125
    assert usage.as_dict() == {"graph_steps": 3, "graph_rows": 21, "padding_rows": 3,
                               "eager_decode_steps": 2, "padding_fraction": 0.125}


# ---- the second graphs of short contexts ----------------------------------------------------

def _planner(num_sms: int):  # noqa: ANN202 - the workspace_size callable of the kernels' planner
    import cacheflow_kernels

    def workspace(num_seqs: int, heads: int, kv_heads: int, head_size: int, context: int) -> int:
        return cacheflow_kernels.paged_attention_workspace_size(
            num_seqs, heads, kv_heads, head_size, context, num_sms=num_sms)
    return workspace


def _partitions(workspace, num_seqs: int, shape: tuple[int, int, int], context: int) -> int:  # noqa: ANN001
    heads, kv_heads, head_size = shape
    return workspace(num_seqs, heads, kv_heads, head_size, context) // (
        num_seqs * heads * (head_size + 2))


def test_short_limit_follows_the_planner() -> None:
    """At batch 1 a 7B layer (32 heads of 128, 32 CTAs: never cut below 256 tokens) is split from
    some context on; up to the limit the planner splits nothing, one step past it it splits."""
    workspace = _planner(132)
    shape = [(32, 32, 128)]
    limit = short_context_limit(1, shape, 4096, workspace)
    assert 0 < limit < 4096 and limit % CONTEXT_STEP == 0
    assert all(workspace(1, 32, 32, 128, c) == 0 for c in range(CONTEXT_STEP, limit + 1, 16))
    assert workspace(1, 32, 32, 128, limit + CONTEXT_STEP) > 0
    # a batch that fills the GPU is never split: its main graph is already unsplit
    assert short_context_limit(256, shape, 4096, workspace) == 4096


def test_short_limit_covers_the_fine_splits_of_small_grids() -> None:
    """GQA-8 at batch 1 (4 CTAs unsplit): the planner cuts short contexts into 128-token
    partitions; the second graph covers those contexts too, up to the first plan of partitions
    of SHORT_PARTITION tokens or more."""
    workspace = _planner(132)
    shape = (32, 4, 128)
    limit = short_context_limit(1, [shape], 32768, workspace)
    first_split = next(c for c in range(CONTEXT_STEP, limit, CONTEXT_STEP)
                       if workspace(1, *shape, c) > 0)
    assert first_split < limit < 32768
    for c in range(first_split, limit + 1, CONTEXT_STEP):
        parts = _partitions(workspace, 1, shape, c)
        assert parts == 0 or -(-c // parts) <= SHORT_PARTITION - CONTEXT_STEP
    parts = _partitions(workspace, 1, shape, limit + CONTEXT_STEP)
    assert parts >= 2 and -(-(limit + CONTEXT_STEP) // parts) > SHORT_PARTITION - CONTEXT_STEP


def test_short_limit_is_the_strictest_layer() -> None:
    splits_from = {(32, 32, 128): 512, (32, 8, 128): 1024}

    def workspace(num_seqs: int, heads: int, kv_heads: int, head_size: int, context: int) -> int:
        return 0 if context < splits_from[(heads, kv_heads, head_size)] else 1

    assert short_context_limit(1, [(32, 8, 128)], 2048, workspace) == 960
    assert short_context_limit(1, [(32, 8, 128), (32, 32, 128)], 2048, workspace) == 448
    assert short_context_limit(1, [(32, 32, 128)], 448, workspace) == 448  # nothing splits
    assert short_context_limit(1, [(32, 32, 128)], 2048, lambda *a: 1) == 0
    # always two partitions: short up to 384 tokens (192 each); at 448 a partition rounds up
    # to 256 tokens
    def two(num_seqs: int, heads: int, kv_heads: int, head_size: int, context: int) -> int:
        return num_seqs * heads * 2 * (head_size + 2)

    assert short_context_limit(1, [(32, 32, 128)], 2048, two) == 384


def test_second_graph_context() -> None:
    """The short-context limit where the main plan at max_model_len has long partitions; where
    even that plan cuts the context into short partitions, the longest unsplit context."""
    def fine(num_seqs: int, heads: int, kv_heads: int, head_size: int, context: int) -> int:
        # whole below 512 tokens, then 128-token partitions at every context
        return 0 if context < 512 else num_seqs * heads * (context // 128) * (head_size + 2)

    def coarse(num_seqs: int, heads: int, kv_heads: int, head_size: int, context: int) -> int:
        # also 512-token partitions from 2048 tokens on
        parts = context // 128 if context < 2048 else context // 512
        return 0 if context < 512 else num_seqs * heads * parts * (head_size + 2)

    shape = [(32, 8, 128)]
    assert short_context_limit(1, shape, 4096, fine) == 4096
    assert second_graph_context(1, shape, 4096, fine) == 448
    assert short_context_limit(1, shape, 4096, coarse) == 1984
    assert second_graph_context(1, shape, 4096, coarse) == 1984
    assert second_graph_context(1, shape, 448, fine) == 448  # nothing splits: no second graph


def test_steps_pick_the_short_context_graph_within_its_limit() -> None:
    graphs = object.__new__(DecodeGraphs)  # the selection rule only: no capture on the CPU
    graphs.max_model_len = 4096
    graphs.short_limits = {1: 448, 40: 832}  # the sizes whose main graph splits
    assert graphs.graph_key(1, 1) == (1, 448)
    assert graphs.graph_key(1, 448) == (1, 448)
    assert graphs.graph_key(1, 449) == (1, 4096)
    assert graphs.graph_key(40, 832) == (40, 832)
    assert graphs.graph_key(40, 833) == (40, 4096)
    assert graphs.graph_key(8, 100) == (8, 4096)  # no second graph: its main one is unsplit
