"""Loading helpers for tests of a model port: the model at a rank, with other tensors, the
checkpoint's tensors, and the tensor-parallel shard round trip."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cacheflow_models.checks.shards import shard_round_trip
from cacheflow_models.hf_config import build_model_config
from cacheflow_runtime.model_loader import load_model
from cacheflow_runtime.registry import load_model_class
from cacheflow_runtime.weights import iterate_weights


def load_tiny_model(path: str | Path) -> nn.Module:
    """The registered model for the checkpoint at ``path``, loaded on the CPU in float32 at the
    current tensor-parallel rank."""
    return load_model(build_model_config(path, "float32"), torch.device("cpu"))


def load_with_weights(path: str | Path, weights: list[tuple[str, torch.Tensor]]) -> nn.Module:
    """Builds the model of the checkpoint at ``path`` and loads ``weights`` into it instead of
    the checkpoint's own tensors (to test renamed, extra, missing or misshapen tensors: the
    model's ``load_weights`` raises WeightLoadError)."""
    config = build_model_config(path, "float32")
    model = load_model_class(config.architecture)(config.hf_config)
    model.load_weights(weights, "safetensors")
    return model


def checkpoint_tensors(path: str | Path) -> list[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint at ``path``, copied out of the file."""
    return [(name, tensor.clone()) for name, tensor in iterate_weights(path)]


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    """Both models hold exactly the same parameter values under the same names."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys(), sorted(set(pa) ^ set(pb))
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def assert_tp_shards_roundtrip(path: str | Path, world_size: int) -> int:
    """Loads the checkpoint at ``path`` whole and as each rank of ``world_size`` (in this
    process, no process group) and asserts that every parallel parameter's shards put together
    give the whole tensor, and that replicated ones are equal on every rank.

    Returns how many parameters were checked (tied ones once).
    """
    config = build_model_config(path, "float32")
    full = load_tiny_model(path)
    ok, detail = shard_round_trip(config, full, world_size)
    assert ok, f"world size {world_size}: {detail}"
    checked = int(detail.split(" ", 1)[0])
    assert checked == len(list(full.parameters())), detail
    return checked
