"""Which registered architecture serves an HF config.

The one registry is the ``cacheflow.models`` entry-point group (this package publishes its
built-in classes there in pyproject.toml; a third-party package registers its own the same way).

Configs read from GGUF files name no ``architectures``, only a ``model_type``; the
``cacheflow.gguf_model_types`` entry-point group maps a model type to the class that serves it::

    [project.entry-points."cacheflow.gguf_model_types"]
    stablelm = "my_package.model:StableLmForCausalLM"

This package publishes its own model types there too. A plugin's entry for a model type takes
precedence over the built-in one; two plugins claiming the same model type is an error.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from transformers import PretrainedConfig

from cacheflow_runtime.registry import ENTRY_POINT_GROUP, supported_architectures

GGUF_MODEL_TYPE_GROUP = "cacheflow.gguf_model_types"
_BUILT_IN_DISTRIBUTION = "cacheflow-models"


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or getattr(dist, "metadata", {}).get("Name", "")
    return str(name or "").replace("_", "-").lower()


def gguf_model_types() -> dict[str, str]:
    """``model_type`` -> architecture name for configs without ``architectures`` (GGUF files).

    The architecture is the ``cacheflow.models`` name registered for the same class, else the
    class's import path (which ``load_model_class`` imports directly). Raises ValueError when
    two plugins claim one model type.
    """
    names_of = {ep.value: ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    built_in: dict[str, str] = {}
    plugins: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GGUF_MODEL_TYPE_GROUP):
        if _distribution(ep) == _BUILT_IN_DISTRIBUTION:
            built_in[ep.name] = ep.value
        else:
            plugins.setdefault(ep.name, []).append(ep)
    table = dict(built_in)
    for model_type, eps in plugins.items():
        values = sorted({ep.value for ep in eps})
        if len(values) > 1:
            raise ValueError(f"model type {model_type!r} is claimed by several packages in the "
                             f"{GGUF_MODEL_TYPE_GROUP!r} entry-point group: {', '.join(values)}"
                             "; uninstall all but one")
        table[model_type] = values[0]
    return {model_type: names_of.get(value, value) for model_type, value in table.items()}


def resolve_architecture(config: PretrainedConfig) -> str:
    """The registered architecture that serves ``config`` (ValueError listing supported ones).

    A config that names ``architectures`` is served by the first registered one among them,
    never by its ``model_type``'s class: ``LlamaForSequenceClassification`` or
    ``LlavaLlamaForCausalLM`` (model type llama) are refused, not run as LlamaForCausalLM.
    Only configs without ``architectures`` (GGUF files) fall back to the ``model_type`` table.
    """
    known = set(supported_architectures())
    names = list(getattr(config, "architectures", None) or [])
    if names:
        for name in names:
            if name in known:
                return name
        raise ValueError(f"{_named(names)} not supported; supported architectures: "
                         f"{', '.join(sorted(known))}")
    model_type = getattr(config, "model_type", "") or "unknown"
    default = gguf_model_types().get(model_type)
    # An import path comes only from the GGUF table, never from a checkpoint's config.
    if default and (default in known or ":" in default):
        return default
    raise ValueError(f"model architecture {default or model_type!r} is not supported; supported "
                     f"architectures: {', '.join(sorted(known))}")


def _named(names: list[str]) -> str:
    """'model architecture 'X' is' for one name, 'model architectures ['X', 'Y'] are' else."""
    if len(names) == 1:
        return f"model architecture {names[0]!r} is"
    return f"model architectures {names} are"
