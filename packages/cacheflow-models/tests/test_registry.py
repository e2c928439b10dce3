"""GGUF model types through the cacheflow.gguf_model_types entry points: built-in ones, a
plugin's override, two plugins in conflict, and an import path never taken from config.json;
architectures a config names that none is registered for are refused by name, never served by
their model type's class."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import PretrainedConfig

from cacheflow_models import registry
from cacheflow_runtime.registry import supported_architectures


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


# Every registered architecture, as the error lists them.
SUPPORTED = f"supported architectures: {', '.join(supported_architectures())}"


@pytest.mark.parametrize("architecture", ["LlamaForSequenceClassification",
                                          "LlavaLlamaForCausalLM"])
def test_unsupported_architecture_is_not_served_by_its_model_type(architecture: str) -> None:
    config = PretrainedConfig(architectures=[architecture], model_type="llama")
    with pytest.raises(ValueError) as exc:
        registry.resolve_architecture(config)
    assert str(exc.value) == f"model architecture {architecture!r} is not supported; {SUPPORTED}"
    assert "LlamaForCausalLM, MistralForCausalLM" in SUPPORTED


def test_several_unsupported_architectures_are_all_named() -> None:
    config = PretrainedConfig(
        architectures=["LlavaLlamaForCausalLM", "LlamaForTokenClassification"],
        model_type="llama")
    with pytest.raises(ValueError) as exc:
        registry.resolve_architecture(config)
    assert str(exc.value) == ("model architectures ['LlavaLlamaForCausalLM', "
                              f"'LlamaForTokenClassification'] are not supported; {SUPPORTED}")


def test_first_supported_architecture_is_taken() -> None:
    config = PretrainedConfig(architectures=["LlavaLlamaForCausalLM", "MistralForCausalLM"],
                              model_type="llama")
    assert registry.resolve_architecture(config) == "MistralForCausalLM"


def test_unknown_model_type_without_architectures_is_refused() -> None:
    with pytest.raises(ValueError) as exc:
        registry.resolve_architecture(PretrainedConfig(model_type="foo"))
    assert str(exc.value) == f"model architecture 'foo' is not supported; {SUPPORTED}"


def test_two_plugins_claiming_a_model_type_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, [_ep("stablelm", "a.m:A", GGUF, "pkg-a"),
                           _ep("stablelm", "b.m:B", GGUF, "pkg-b")])
    with pytest.raises(ValueError, match="model type 'stablelm' is claimed by several packages "
                                         "in the 'cacheflow.gguf_model_types' entry-point "
                                         "group: a.m:A, b.m:B"):
        registry.gguf_model_types()
