"""Helpers every model's ``load_weights`` uses: strict accounting and GGUF name translation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn

from cacheflow_runtime.attention import is_kv_scale_name, load_kv_scale
from cacheflow_runtime.layers.linear import default_weight_loader

WeightIterator = Iterable[tuple[str, torch.Tensor]]


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: a tensor is missing, extra or of the wrong shape."""


class StrictLoader:
    """Loads named checkpoint tensors into a model's parameters and accounts for every one.

    ``stacked`` maps a checkpoint name fragment to (fused parameter fragment, shard id), e.g.
    ``".q_proj." -> (".qkv_proj.", "q")``. Fragments match whole dot-separated name parts
    (``.q_proj.`` never matches inside ``qkv_proj``; leading and trailing dots are optional),
    the first matching entry wins, and a parameter loaded in parts counts as loaded once every
    part with a shard id arrived. A shard id of None loads a tensor whole (e.g. a checkpoint
    that already fuses ``qkv_proj`` or ``gate_up_proj``: map it to itself, or leave it out,
    since a name that matches no fragment loads whole into the parameter of that name).

    ``ignore`` lists checkpoint name suffixes that no parameter takes on purpose (rotary
    inv_freq buffers, causal-mask buffers). ``optional`` lists parameter names that may stay
    unloaded (a tied LM head).

    ``source`` is the iterator the runtime handed to ``load_weights`` (its ``CheckpointWeights``):
    errors then name the checkpoint (``source.path``) and the file each tensor came from
    (``source.current_file``). Pass it even when the model wraps the iterator (GGUF renaming):
    the wrapper is consumed in step with it.
    """

    def __init__(self, model: nn.Module, stacked: Optional[dict[str, tuple[str, object]]] = None,
                 ignore: Iterable[str] = (), optional: Iterable[str] = (),
                 source: Optional[Any] = None) -> None:
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.stacked = stacked or {}
        self.ignore = tuple(ignore)
        self.optional = set(optional)
        self.source = source
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []
        self.unexpected_files: dict[str, Optional[str]] = {}

    def _current_file(self) -> Optional[str]:
        file = getattr(self.source, "current_file", None)
        return None if file is None else str(file)

    def _where(self) -> str:
        """' (in FILE)' for the file the latest tensor came from, if the source tells."""
        file = self._current_file()
        return f" (in {file})" if file is not None else ""

    def load(self, weights: WeightIterator) -> None:
        """Loads every tensor, then raises WeightLoadError if anything did not match."""
        if self.source is None:
            self.source = weights
        for name, tensor in weights:
            self.load_one(name, tensor)
        self.finish()

    def load_one(self, name: str, tensor: torch.Tensor) -> None:
        """Loads one checkpoint tensor (shape errors raise at once, naming the tensor)."""
        if name.endswith(self.ignore) and self.ignore:
            return
        target, shard_id = name, None
        for fragment, (fused, sid) in self.stacked.items():
            renamed = replace_name_part(name, fragment, fused)
            if renamed is not None:
                target, shard_id = renamed, sid
                break
        param = self.params.get(target)
        if param is None and is_kv_scale_name(name):
            # FP8 KV-cache scales go to the runtime's attention layer (not a parameter).
            try:
                if load_kv_scale(self.model, name, tensor):
                    return
            except ValueError as exc:
                raise WeightLoadError(f"checkpoint tensor {name!r}{self._where()}: {exc}") from exc
        if param is None:
            self.unexpected.append(name)
            self.unexpected_files[name] = self._current_file()
            return
        loader: Callable[..., None] = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as exc:
            raise WeightLoadError(f"checkpoint tensor {name!r}{self._where()}: {exc}") from exc
        self.loaded.add(target if shard_id is None else f"{target}#{shard_id}")

    def finish(self) -> None:
        """Raises WeightLoadError naming unexpected tensors and parameters never loaded."""
        problems = []
        if self.unexpected:
            names = sorted(self.unexpected)[:10]
            problems.append(f"tensors in the checkpoint that no parameter takes: {names}"
                            f"{_more(self.unexpected)}{self._files_of(names)}")
        missing = sorted(n for n in self.params
                         if n not in self.optional and self._missing_tensors(n))
        if missing:
            tensors = [t for n in missing[:10] for t in self._missing_tensors(n)]
            details = [] if tensors == missing[:10] else [f"missing checkpoint tensors {tensors}"]
            path = getattr(self.source, "path", None)
            if path is not None:
                details.append(f"checkpoint {path}")
            suffix = f" ({'; '.join(details)})" if details else ""
            problems.append(f"parameters not found in the checkpoint: {missing[:10]}"
                            f"{_more(missing)}{suffix}")
        if problems:
            raise WeightLoadError("; ".join(problems))

    def _files_of(self, names: list[str]) -> str:
        """' (in FILE)' or ' (in FILE: a, b; in FILE2: c)' for unexpected tensors."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            file = self.unexpected_files.get(name)
            if file is not None:
                by_file.setdefault(file, []).append(repr(name))
        if not by_file:
            return ""
        if len(by_file) == 1:
            return f" (in {next(iter(by_file))})"
        return " (" + "; ".join(f"in {f}: {', '.join(n)}" for f, n in by_file.items()) + ")"

    def _missing_tensors(self, name: str) -> list[str]:
        """Checkpoint names of the tensors parameter ``name`` still lacks (none if loaded)."""
        if name in self.loaded:
            return []
        parts = [(fragment, fused, sid) for fragment, (fused, sid) in self.stacked.items()
                 if sid is not None and replace_name_part(name, fused, fragment) is not None]
        if not parts:
            return [name]
        missing: dict[str, str] = {}  # shard id -> the first fragment naming it
        for fragment, fused, sid in parts:
            if f"{name}#{sid}" not in self.loaded:
                missing.setdefault(str(sid), str(replace_name_part(name, fused, fragment)))
        return list(missing.values())


def replace_name_part(name: str, fragment: str, replacement: str) -> Optional[str]:
    """``name`` with its first occurrence of ``fragment`` replaced, where the fragment covers
    whole dot-separated parts of the name; None when it does not occur that way.

    ``replace_name_part("model.layers.0.self_attn.q_proj.weight", ".q_proj.", ".qkv_proj.")``
    gives ``"model.layers.0.self_attn.qkv_proj.weight"``; the fragment ``".q_proj."`` (or
    ``"q_proj"``, or ``"v_proj"``) does not match ``"...qkv_proj.weight"``.
    """
    core = fragment.strip(".")
    if not core:
        raise ValueError(f"empty name fragment {fragment!r}")
    padded = f".{name}."
    start = padded.find(f".{core}.")
    if start < 0:
        return None
    new_core = replacement.strip(".")
    renamed = padded[:start + 1] + new_core + padded[start + 1 + len(core):]
    return renamed[1:-1]


def _more(items: list[str], shown: int = 10) -> str:
    return f" and {len(items) - shown} more" if len(items) > shown else ""


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
