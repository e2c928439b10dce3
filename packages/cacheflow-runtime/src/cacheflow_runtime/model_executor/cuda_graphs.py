"""CUDA graphs of decode steps.

A decode step of a small batch launches a few hundred kernels from Python (about a dozen per
layer), which takes far longer on the host than the kernels take on the GPU. The model's forward
for a decode step is therefore captured once per batch size of DECODE_GRAPH_BATCH_SIZES (up to
the scheduler's ``max_num_seqs``) into a CUDA graph over static input buffers, and a decode step
copies its inputs into those buffers and replays the graph of the smallest captured size that
holds it. Padding rows have slot -1 (nothing written to the KV cache) and a context of 0 tokens
(attention reads nothing and returns zeros); their outputs are dropped.

The attention kernels see ``max_context_len = max_model_len`` in a batch size's main graph, so
its split-K plan is fixed at capture and it serves every context length. Where that plan
splits the context (small batches: too few CTAs to fill the GPU otherwise), the same batch
size gets a second graph for short contexts, captured at the longest context up to which the
kernels' planner either does not split at that batch size or cuts the context into partitions
shorter than SHORT_PARTITION tokens (small grids, which it splits finely even at short
contexts; :func:`short_context_limit`), or, where the main plan's partitions are that short
already, at the longest context it leaves whole (:func:`second_graph_context`); a step whose
longest context is within it replays that graph, so short contexts skip the main plan's long
or mostly empty partitions and its merge. Steps that are not pure decodes (prompts, chunks), larger
batches, and models whose forward depends on per-step host values (dynamic NTK rotary scaling)
run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

import cacheflow_kernels
from cacheflow_runtime.attention import cuda
from cacheflow_runtime.attention.metadata import InputMetadata, build_input_metadata
from cacheflow_runtime.attention.paged_attention import PagedAttention

logger = logging.getLogger(__name__)

#: Batch sizes captured up to 256 (those up to max_num_seqs); past 256 every
#: LARGE_BATCH_STEP-th size, and max_num_seqs itself, so that every decode batch the scheduler
#: can form has a graph. A decode step of n sequences replays the smallest one >= n.
DECODE_GRAPH_BATCH_SIZES: tuple[int, ...] = (
    1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
LARGE_BATCH_STEP = 64


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes to capture for a scheduler of ``max_num_seqs`` sequences (ascending,
    the last one ``max_num_seqs``)."""
    sizes = [s for s in DECODE_GRAPH_BATCH_SIZES if s <= max_num_seqs]
    sizes += range(DECODE_GRAPH_BATCH_SIZES[-1] + LARGE_BATCH_STEP, max_num_seqs,
                   LARGE_BATCH_STEP)
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


def graph_batch_size(num_seqs: int, sizes: list[int]) -> Optional[int]:
    """The smallest captured size that holds ``num_seqs`` sequences, or None."""
    fitting = [s for s in sizes if s >= num_seqs]
    return min(fitting) if fitting and num_seqs > 0 else None


#: Contexts are tried in steps of this many tokens (the kernels' partition alignment).
CONTEXT_STEP = 64
#: An attention layer's shape as the split planner sees it: (num_heads, num_kv_heads, head_size).
AttentionShape = tuple[int, int, int]


#: Partitions shorter than this many tokens are short: the kernels' planner cuts a context this
#: finely only for grids of at most one CTA per SM (``MIN_WAVE_PARTITION`` in
#: cacheflow_kernels._attention_ops), where a graph captured at a longer context still serves
#: the shorter ones well (each partition a short CTA).
SHORT_PARTITION = 256


def _short_plan(workspace: int, batch_size: int, shape: AttentionShape, context: int,
                partition_below: int = SHORT_PARTITION) -> bool:
    """Whether the planner's plan with ``workspace`` floats (the kernels' ``num_seqs * num_heads
    * partitions * (head_size + 2)``; 0 without a split) leaves ``context`` whole or cuts it into
    partitions shorter than ``partition_below`` tokens. A workspace not of that form counts as a
    split into long partitions."""
    if workspace == 0:
        return True
    heads, _, head_size = shape
    parts = workspace // (batch_size * heads * (head_size + 2))
    if parts < 2:
        return False
    length = -(-context // parts)
    return -(-length // CONTEXT_STEP) * CONTEXT_STEP < partition_below


def short_context_limit(batch_size: int, shapes: Iterable[AttentionShape],
                        max_model_len: int,
                        workspace_size: Callable[[int, int, int, int, int], int],
                        partition_below: int = SHORT_PARTITION) -> int:
    """The longest context (a multiple of CONTEXT_STEP, at most ``max_model_len``) up to which
    the decode kernel's planner, at ``batch_size`` sequences, splits no layer's context or only
    into partitions shorter than ``partition_below`` tokens (CONTEXT_STEP: no split at all).
    ``workspace_size(num_seqs, num_heads, num_kv_heads, head_size, max_context_len)`` is the
    planner's workspace (0: no split). Returns ``max_model_len`` when that holds there, 0 when
    not even at CONTEXT_STEP."""
    shapes = sorted(set(shapes))

    def short(context: int) -> bool:
        return all(_short_plan(workspace_size(batch_size, *shape, context), batch_size, shape,
                               context, partition_below) for shape in shapes)

    if short(max_model_len):
        return max_model_len
    limit = 0
    for context in range(CONTEXT_STEP, max_model_len, CONTEXT_STEP):
        if not short(context):
            break
        limit = context
    return limit


def second_graph_context(batch_size: int, shapes: Iterable[AttentionShape], max_model_len: int,
                         workspace_size: Callable[[int, int, int, int, int], int]) -> int:
    """The context a batch size's second decode graph is captured at (0 < it < ``max_model_len``;
    otherwise the batch size gets no second graph): :func:`short_context_limit`, or, where the
    main graph's own plan already cuts ``max_model_len`` into short partitions (a small grid),
    the longest context the planner leaves whole, whose steps then skip the merge and the
    mostly empty partitions of that plan."""
    shapes = sorted(set(shapes))
    limit = short_context_limit(batch_size, shapes, max_model_len, workspace_size)
    if limit < max_model_len:
        return limit
    return short_context_limit(batch_size, shapes, max_model_len, workspace_size, CONTEXT_STEP)


def attention_shapes(model: torch.nn.Module) -> list[AttentionShape]:
    """The distinct (num_heads, num_kv_heads, head_size) of the model's attention layers."""
    return sorted({(m.num_heads, m.num_kv_heads, m.head_size) for m in model.modules()
                   if isinstance(m, PagedAttention)})


def supports_graphs(model: torch.nn.Module, block_size: int) -> bool:
    """Whether a decode step of ``model`` can be captured: every attention layer decodes on the
    CUDA kernel (the reference backend loops over host lists), and no layer reads per-step host
    values (dynamic NTK rotary scaling)."""
    for module in model.modules():
        if getattr(module, "dynamic_factor", None) is not None:
            return False
        if isinstance(module, PagedAttention) and (
                module.backend == "reference" or not cuda.available()
                or not cuda.supports_head_size(module.head_size)
                or block_size not in cacheflow_kernels.PAGED_ATTENTION_BLOCK_SIZES):
            return False
    return True


def is_decode_step(metadata: InputMetadata) -> bool:
    """Every sequence has one new token and only its last hidden state is sampled (and no
    cascade over a shared prefix, whose shapes change from step to step)."""
    return (not metadata.is_prompt and metadata.num_seqs > 0 and metadata.cascade is None
            and all(q == 1 for q in metadata.query_lens)
            and metadata.logit_indices.shape[0] == metadata.num_seqs)


@dataclass
class CudaGraphUsage:
    """How decode steps used the captured graphs since the engine started: steps replayed
    from a graph, their sequences, and the padding rows added to reach a captured size
    (computed for nothing); ``eager_decode_steps`` are pure decode steps that ran without a
    graph (larger than the largest size, or a cascade step)."""

    graph_steps: int = 0
    graph_rows: int = 0
    padding_rows: int = 0
    eager_decode_steps: int = 0

    @property
    def padding_fraction(self) -> float:
        """Padding rows over all rows computed by graph replays (0 when none ran)."""
        total = self.graph_rows + self.padding_rows
        return self.padding_rows / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters and the padding fraction, for reports."""
        return {**asdict(self), "padding_fraction": self.padding_fraction}


class DecodeGraphs:
    """The captured decode graphs of one model and KV cache, and their static inputs."""

    def __init__(self, model: Any, device: torch.device, kv_caches: list[Any], block_size: int,
                 max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        n = max(self.sizes)
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logit_indices = torch.arange(n, dtype=torch.int64, device=device)
        # The batch sizes whose main graph splits the context into long partitions, and the
        # contexts their second graph serves.
        shapes = attention_shapes(model)
        limits = {size: second_graph_context(size, shapes, max_model_len, self._workspace_size)
                  for size in self.sizes}
        self.short_limits = {s: c for s, c in limits.items() if 0 < c < max_model_len}
        # Keyed by (batch size, captured max_context_len).
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.usage = CudaGraphUsage()
        self._capture_all()

    def _workspace_size(self, num_seqs: int, num_heads: int, num_kv_heads: int,
                        head_size: int, max_context_len: int) -> int:
        return cacheflow_kernels.paged_attention_workspace_size(
            num_seqs, num_heads, num_kv_heads, head_size, max_context_len,
            device=self.input_ids.device)

    def _keys(self) -> list[tuple[int, int]]:
        """(batch size, max_context_len) of every graph to capture."""
        return ([(size, self.max_model_len) for size in self.sizes]
                + list(self.short_limits.items()))

    def _metadata(self, size: int, max_context_len: int) -> InputMetadata:
        return build_input_metadata(
            [1] * size, [max_context_len] * size, self.block_tables[:size],
            self.slot_mapping[:size], self.logit_indices[:size], self.input_ids.device,
            query_start_loc=self.query_start_loc[:size + 1],
            context_lens_tensor=self.context_lens[:size])

    def _forward(self, size: int, max_context_len: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches,
                          self._metadata(size, max_context_len))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        # Largest first: its memory pool then serves the smaller graphs.
        for key in sorted(self._keys(), reverse=True):
            self._forward(*key)  # warm-up: lazy initialisation must not happen under capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(*key)
            pool = graph.pool()
            self.graphs[key] = graph
            self.outputs[key] = out
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs of decode steps for batch sizes %s (and for short "
                    "contexts, up to: %s)", self.sizes, self.short_limits)

    def graph_key(self, size: int, max_context_len: int) -> tuple[int, int]:
        """The graph a decode step of ``size`` rows (a captured size) with contexts up to
        ``max_context_len`` replays: the short-context one where it covers them, else the main
        one."""
        limit = self.short_limits.get(size, 0)
        return (size, limit) if max_context_len <= limit else (size, self.max_model_len)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: InputMetadata) -> Optional[torch.Tensor]:
        """Hidden states [num_seqs, hidden] of a decode step from a graph, or None when no
        captured graph applies (the caller then runs the model eagerly)."""
        if not is_decode_step(metadata):
            if not metadata.is_prompt and metadata.cascade is not None:
                self.usage.eager_decode_steps += 1
            return None
        n = metadata.num_seqs
        size = graph_batch_size(n, self.sizes)
        cols = metadata.block_tables.shape[1]
        if size is None or cols > self.block_tables.shape[1]:
            self.usage.eager_decode_steps += 1
            return None
        self.usage.graph_steps += 1
        self.usage.graph_rows += n
        self.usage.padding_rows += size - n
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.context_lens[:n].copy_(metadata.context_lens)
        self.block_tables[:n, :cols].copy_(metadata.block_tables)
        if size > n:
            self.slot_mapping[n:size].fill_(-1)
            self.context_lens[n:size].zero_()
        key = self.graph_key(size, metadata.max_context_len)
        self.graphs[key].replay()
        return self.outputs[key][:n]
