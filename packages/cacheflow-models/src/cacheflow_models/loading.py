"""Helpers every model's ``load_weights`` uses: strict accounting and GGUF name translation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import torch
from torch import nn

from cacheflow_runtime.layers.linear import default_weight_loader

WeightIterator = Iterable[tuple[str, torch.Tensor]]


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: a tensor is missing, extra or of the wrong shape."""


class StrictLoader:
    """Loads named checkpoint tensors into a model's parameters and accounts for every one.

    ``stacked`` maps a checkpoint name fragment to (fused parameter fragment, shard id), e.g.
    ``".q_proj." -> (".qkv_proj.", "q")``. ``ignore`` lists checkpoint name suffixes that no
    parameter takes on purpose (rotary inv_freq buffers, causal-mask buffers). ``optional`` lists
    parameter names that may stay unloaded (a tied LM head).
    """

    def __init__(self, model: nn.Module, stacked: Optional[dict[str, tuple[str, object]]] = None,
                 ignore: Iterable[str] = (), optional: Iterable[str] = ()) -> None:
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.stacked = stacked or {}
        self.ignore = tuple(ignore)
        self.optional = set(optional)
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []

    def load(self, weights: WeightIterator) -> None:
        """Loads every tensor, then raises WeightLoadError if anything did not match."""
        for name, tensor in weights:
            self.load_one(name, tensor)
        self.finish()

    def load_one(self, name: str, tensor: torch.Tensor) -> None:
        """Loads one checkpoint tensor (shape errors raise at once, naming the tensor)."""
        if name.endswith(self.ignore) and self.ignore:
            return
        target, shard_id = name, None
        for fragment, (fused, sid) in self.stacked.items():
            if fragment in name:
                target, shard_id = name.replace(fragment, fused), sid
                break
        param = self.params.get(target)
        if param is None:
            self.unexpected.append(name)
            return
        loader: Callable[..., None] = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as exc:
            raise WeightLoadError(f"checkpoint tensor {name!r}: {exc}") from exc
        self.loaded.add(target if shard_id is None else f"{target}#{shard_id}")

    def finish(self) -> None:
        """Raises WeightLoadError naming unexpected tensors and parameters never loaded."""
        problems = []
        if self.unexpected:
            problems.append(f"tensors in the checkpoint that no parameter takes: "
                            f"{sorted(self.unexpected)[:10]}")
        missing = [n for n in self.params if n not in self.optional and not self._is_loaded(n)]
        if missing:
            problems.append(f"parameters not found in the checkpoint: {sorted(missing)[:10]}")
        if problems:
            raise WeightLoadError("; ".join(problems))

    def _is_loaded(self, name: str) -> bool:
        if name in self.loaded:
            return True
        shards = [sid for fragment, (fused, sid) in self.stacked.items()
                  if fused in name and f"{name}#{sid}" in self.loaded]
        wanted = [sid for fragment, (fused, sid) in self.stacked.items() if fused in name]
        return bool(wanted) and len(shards) == len(wanted)


def unpermute_gguf_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's reordering of q/k projection rows for its interleaved rotary.

    The GGUF converter turns each head's [first half; second half] rows into interleaved pairs;
    this restores HF's order.
    """
    rows = weight.shape[0]
    head_rows = rows // num_heads
    return (weight.reshape(num_heads, head_rows // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def rename_gguf(weights: WeightIterator, names: Callable[[str], Optional[str]],
                transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Maps GGUF tensor names to HF names (``names`` returns None for tensors to skip)."""
    for gguf_name, tensor in weights:
        hf_name = names(gguf_name)
        if hf_name is None:
            continue
        yield hf_name, (transform(hf_name, tensor) if transform else tensor)
