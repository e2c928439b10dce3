"""Tensor-parallel shard round trip: each rank's model, built and loaded in this process, holds
slices that put together give the full model's tensors.

Only construction and loading run per rank, so no process group (and no NCCL) is needed: the
runtime's ``tensor_parallel_shard`` sets the rank and world size the layers read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from cacheflow_runtime.config import ModelConfig
from cacheflow_runtime.layers.embedding import VocabParallelEmbedding
from cacheflow_runtime.layers.fused_moe import FusedMoE
from cacheflow_runtime.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from cacheflow_runtime.parallel_state import tensor_parallel_shard
from cacheflow_runtime.registry import load_model_class
from cacheflow_runtime.weights import iterate_weights


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_rank(model_config: ModelConfig, world_size: int, rank: int) -> nn.Module:
    """Rank ``rank``'s model of ``world_size``, on the CPU, with its weights loaded."""
    cls = load_model_class(model_config.architecture)
    fmt = model_config.weights_format or "safetensors"
    with tensor_parallel_shard(world_size, rank), _default_dtype(model_config.dtype), \
            torch.device("cpu"):
        model = cls(model_config.hf_config)
        model.load_weights(iterate_weights(model_config.model_path, fmt), fmt)
    return model


def _cat_parts(shards: list[torch.Tensor], sizes: list[int],
               owners: list[list[int]]) -> list[torch.Tensor]:
    """Part i of every fused shard (rows ``sizes``), concatenated over the ranks ``owners[i]``."""
    split = [s.split(sizes, dim=0) for s in shards]
    return [torch.cat([split[r][i] for r in owners[i]], dim=0) for i in range(len(sizes))]


def unshard(module: nn.Module, attr: str, shards: list[torch.Tensor],
            rank_modules: list[nn.Module]) -> tuple[torch.Tensor, Optional[str]]:
    """The full tensor that the ranks' ``shards`` of ``module.<attr>`` stand for.

    Returns (tensor, problem): problem names ranks whose copies of a replicated part differ.
    Column-parallel layers are split by rows (fused ones per part, KV heads replicated when
    there are fewer than ranks), row-parallel weights by columns, vocabulary-parallel
    embeddings by rows with padding, MoE experts by their intermediate dimension (per part of
    the fused gate/up weight); anything else is replicated.
    """
    world = len(shards)
    every = list(range(world))
    if isinstance(module, VocabParallelEmbedding):
        return torch.cat(shards, dim=0)[:module.num_embeddings], None
    if isinstance(module, QKVParallelLinear):
        first = rank_modules[0]
        assert isinstance(first, QKVParallelLinear)
        sizes = [first.q_size, first.kv_size, first.kv_size]
        owners = list(range(0, world, first.kv_replicas))
        for r in every:
            kv = shards[r].split(sizes, dim=0)[1:]
            ref = shards[owners[r // first.kv_replicas]].split(sizes, dim=0)[1:]
            if not all(torch.equal(a, b) for a, b in zip(kv, ref)):
                return shards[0], f"rank {r} holds a different copy of its KV heads"
        return torch.cat(_cat_parts(shards, sizes, [every, owners, owners]), dim=0), None
    if isinstance(module, FusedMoE):
        if attr == "w2_weight":  # [E, hidden, intermediate / tp]: split by columns
            return torch.cat(shards, dim=2), None
        # [E, 2 * intermediate / tp, hidden]: each rank's gate rows, then its up rows
        halves = [s.chunk(2, dim=1) for s in shards]
        return torch.cat([torch.cat([h[i] for h in halves], dim=1) for i in (0, 1)], dim=1), None
    if isinstance(module, MergedColumnParallelLinear):
        sizes = [s // world for s in module.output_sizes]
        return torch.cat(_cat_parts(shards, sizes, [every] * len(sizes)), dim=0), None
    if isinstance(module, ColumnParallelLinear):
        return torch.cat(shards, dim=0), None
    if isinstance(module, RowParallelLinear) and attr == "weight":
        return torch.cat(shards, dim=1), None
    differing = [r for r in every if not torch.equal(shards[r], shards[0])]
    return shards[0], (f"replicated on every rank, but ranks {differing} differ from rank 0"
                       if differing else None)


def shard_round_trip(model_config: ModelConfig, full: nn.Module,
                     world_size: int) -> tuple[bool, str]:
    """Builds every rank of ``world_size`` and compares the reassembled tensors with ``full``.

    Returns (ok, detail); detail names the first parameter that does not round-trip.
    """
    ranks = [build_rank(model_config, world_size, r) for r in range(world_size)]
    rank_modules: list[dict[str, Any]] = [dict(m.named_modules()) for m in ranks]
    checked: set[int] = set()
    for mod_name, module in full.named_modules():
        per_rank = [mods[mod_name] for mods in rank_modules]
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in checked:  # a tied weight, already compared under its first name
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            shards = [getattr(m, attr).detach() for m in per_rank]
            whole, problem = unshard(module, attr, shards, per_rank)
            if problem is not None:
                return False, f"{name}: {problem}"
            expected = param.detach().cpu()
            if whole.shape != expected.shape:
                return False, (f"{name}: shards give shape {tuple(whole.shape)}, the full model "
                               f"has {tuple(expected.shape)}")
            if not torch.equal(whole, expected.to(whole.dtype)):
                diff = (whole.float() - expected.float()).abs().max().item()
                return False, f"{name}: shards put together differ from it (max diff {diff:.3g})"
            checked.add(id(param))
    return True, (f"{len(checked)} parameters: {world_size} shards put together equal the full "
                  "tensors")


def tp_size_problem(model_config: ModelConfig, world_size: int) -> Optional[str]:
    """Why ``world_size`` cannot shard this model's attention heads (None if it can)."""
    heads, kv_heads = model_config.num_attention_heads, model_config.num_kv_heads
    if heads % world_size:
        return f"{heads} attention heads are not divisible by {world_size}"
    if kv_heads % world_size and world_size % kv_heads:
        return f"{kv_heads} KV heads neither divide nor are divisible by {world_size}"
    return None
