"""Builds a registered model class on a device and loads its checkpoint into it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from cacheflow_runtime.config import ModelConfig
from cacheflow_runtime.registry import load_model_class
from cacheflow_runtime.weights import detect_format, iterate_weights


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config: ModelConfig, device: torch.device) -> Any:
    """Builds the registered model class on ``device`` in the config's dtype and loads weights."""
    model_cls = load_model_class(model_config.architecture)
    with _default_dtype(model_config.dtype), device:
        model = model_cls(model_config.hf_config)
    fmt = model_config.weights_format or detect_format(model_config.model_path)
    model.load_weights(iterate_weights(model_config.model_path, fmt), fmt)
    return model.eval()
