"""Finds model classes through the ``cacheflow.models`` entry-point group.

cacheflow-models publishes its built-in architectures there, and a third-party package adds one
the same way: ``[project.entry-points."cacheflow.models"] MyForCausalLM = "pkg.mod:MyForCausalLM"``.
An architecture written as an import path, ``"pkg.mod:MyForCausalLM"``, is imported directly
(for a model that is not registered yet, e.g. while it is being ported and checked).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "cacheflow.models"


def supported_architectures() -> list[str]:
    """Names of every architecture registered in the entry-point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_model_class(architecture: str) -> type[Any]:
    """The class registered for ``architecture`` (ValueError listing the supported ones).

    ``"package.module:Class"`` imports that class instead of looking it up.
    """
    if ":" in architecture:
        module, _, name = architecture.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import model class {architecture!r}: {exc}") from exc
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == architecture:
            return ep.load()
    known = ", ".join(supported_architectures()) or "none (is cacheflow-models installed?)"
    raise ValueError(f"model architecture {architecture!r} is not supported; supported "
                     f"architectures: {known}")
