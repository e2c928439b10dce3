"""Which decode batch sizes get a CUDA graph, and how replays are counted (CPU: the rules
only; tests/test_gpu_engine.py captures and replays them on CUDA)."""

from __future__ import annotations

import pytest

from cacheflow_runtime.model_executor.cuda_graphs import (
    CudaGraphUsage,
    capture_sizes,
    graph_batch_size,
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
