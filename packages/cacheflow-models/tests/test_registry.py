"""GGUF model types through the cacheflow.gguf_model_types entry points: built-in ones, a
plugin's override, two plugins in conflict, and an import path never taken from config.json."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import PretrainedConfig

from cacheflow_models import registry


def _ep(name: str, value: str, group: str, dist: str) -> Any:
    ep = EntryPoint(name, value, group)
    return SimpleNamespace(name=ep.name, value=ep.value, group=group,
                           dist=SimpleNamespace(name=dist))


def _install(monkeypatch: pytest.MonkeyPatch, eps: list[Any]) -> None:
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [e for e in eps if e.group == group])


MODELS = "cacheflow.models"
GGUF = registry.GGUF_MODEL_TYPE_GROUP
LLAMA = "cacheflow_models.models.llama:LlamaForCausalLM"


def test_built_in_model_types_are_published() -> None:
    table = registry.gguf_model_types()
    assert table["llama"] == "LlamaForCausalLM"
    assert table["qwen2"] == "Qwen2ForCausalLM"
    assert registry.resolve_architecture(PretrainedConfig(model_type="gpt2")) == \
        "GPT2LMHeadModel"


def test_plugin_overrides_and_unregistered_class_resolves_to_its_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, [
        _ep("LlamaForCausalLM", LLAMA, MODELS, "cacheflow-models"),
        _ep("llama", LLAMA, GGUF, "cacheflow-models"),
        _ep("llama", "plug.mod:MyLlama", GGUF, "cacheflow_plug"),
        _ep("mine", LLAMA, GGUF, "cacheflow-plug"),
    ])
    table = registry.gguf_model_types()
    assert table == {"llama": "plug.mod:MyLlama", "mine": "LlamaForCausalLM"}
    # The import path of a GGUF entry is an architecture the runtime imports directly ...
    assert registry.resolve_architecture(PretrainedConfig(model_type="llama")) == \
        "plug.mod:MyLlama"


def test_import_path_in_config_json_is_not_an_architecture(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = PretrainedConfig(architectures=["os:system"], model_type="unknown_type")
    with pytest.raises(ValueError, match="model architecture 'os:system' is not supported"):
        registry.resolve_architecture(config)


def test_two_plugins_claiming_a_model_type_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, [_ep("stablelm", "a.m:A", GGUF, "pkg-a"),
                           _ep("stablelm", "b.m:B", GGUF, "pkg-b")])
    with pytest.raises(ValueError, match="model type 'stablelm' is claimed by several packages "
                                         "in the 'cacheflow.gguf_model_types' entry-point "
                                         "group: a.m:A, b.m:B"):
        registry.gguf_model_types()
