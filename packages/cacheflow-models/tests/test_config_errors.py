"""Broken model configs, GGUF files and missing tokenizers: a CheckpointError naming the file
and what is wrong, never a transformers or gguf internal error."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_gpt2_gguf import write_gguf

from cacheflow_models import TOKENIZER_FILES, build_model_config, load_tokenizer
from cacheflow_models.testing import save_tiny_checkpoint, tiny_gpt2_config, tiny_llama_config
from cacheflow_runtime import CheckpointError, InvalidArgumentError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_llama_config())


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_gpt2_config(n_positions=1024)
    return write_gguf(save_tiny_checkpoint(tmp_path_factory.mktemp("gguf"), config), config)


def _copy(tiny: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny, path)
    return path


def _edit_config(path: Path, **fields: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    for name, value in fields.items():
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    (path / "config.json").write_text(json.dumps(config))


def _config_error(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        build_model_config(path)
    return info.value


@pytest.mark.parametrize("text, reason", [
    ('{"model_type": "llama", ', "is not valid JSON: Expecting property name"),
    ("", "is not valid JSON: Expecting value: line 1 column 1"),
    ("[1, 2]", "must hold a JSON object, found list"),
])
def test_config_json_that_is_not_a_json_object(tiny: Path, tmp_path: Path, text: str,
                                               reason: str) -> None:
    path = _copy(tiny, tmp_path)
    (path / "config.json").write_text(text)
    err = _config_error(path)
    assert str(err).startswith(f"{path / 'config.json'} {reason}"), str(err)
    assert err.file == str(path / "config.json")


def test_config_json_that_is_not_utf8(tiny: Path, tmp_path: Path) -> None:
    path = _copy(tiny, tmp_path)
    (path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    assert "is not UTF-8 text" in str(_config_error(path))


@pytest.mark.parametrize("missing, what", [
    ("hidden_size", "hidden size (expected 'hidden_size' or 'n_embd' or 'd_model')"),
    ("num_attention_heads", "number of attention heads"),
    ("num_hidden_layers", "number of layers"),
    ("vocab_size", "vocabulary size"),
])
def test_config_without_a_needed_size(tiny: Path, tmp_path: Path, missing: str,
                                      what: str) -> None:
    path = _copy(tiny, tmp_path)
    _edit_config(path, **{missing: None})
    assert str(_config_error(path)).startswith(
        f"{path / 'config.json'} does not give the model's {what}")


@pytest.mark.parametrize("fields, problem", [
    (dict(num_attention_heads=6, head_dim=None), "the hidden size (64) must be divisible by "
                                                 "the number of attention heads (6)"),
    (dict(num_attention_heads=6, num_key_value_heads=6), "StrictDataclassClassValidationError"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) must be a multiple of "
                                  "num_key_value_heads (3)"),
    (dict(hidden_size="64"), None),
    (dict(num_hidden_layers=0), None),
    (dict(vocab_size=True), None),
])
def test_inconsistent_or_mistyped_sizes(tiny: Path, tmp_path: Path, fields: dict[str, Any],
                                        problem: Any) -> None:
    path = _copy(tiny, tmp_path)
    _edit_config(path, **fields)
    message = str(_config_error(path))
    assert str(path / "config.json") in message
    if problem is not None and "Error" in problem:  # transformers' own check, with head_dim
        assert message.startswith(f"cannot read the model config {path / 'config.json'}: "
                                  f"{problem}"), message
    elif problem is not None:
        assert message.endswith(f"is inconsistent: {problem}"), message
    else:
        name, value = next(iter(fields.items()))
        assert f"{name!r} must be a positive integer, got {value!r}" in message


def test_max_model_len_is_an_argument_error(tiny: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"max_model_len must be an integer in "
                                                   r"\[1, 256\] for this model, got 300"):
        build_model_config(tiny, max_model_len=300)
    with pytest.raises(InvalidArgumentError, match=r"got True"):
        build_model_config(tiny, max_model_len=True)


def test_truncated_gguf_names_the_file(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    file = tmp_path / tiny_gguf.name
    rng = random.Random(0)
    for cut in sorted({100, len(data) // 2, *(rng.randrange(24, len(data) // 2)
                                               for _ in range(4))}):
        file.write_bytes(data[:cut])
        for load in (build_model_config, load_tokenizer):
            with pytest.raises(CheckpointError) as info:
                load(file)
            assert str(file) in str(info.value), (cut, load, str(info.value))


def test_flipped_gguf_header_bytes_give_a_checkpoint_error_or_load(tiny_gguf: Path,
                                                                  tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    file = tmp_path / tiny_gguf.name
    rng = random.Random(1)
    failures = 0
    for _ in range(8):
        corrupt = bytearray(data)
        corrupt[rng.randrange(4, 64)] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(corrupt))
        try:
            build_model_config(file)
        except CheckpointError as exc:
            assert str(file) in str(exc)
            failures += 1
    assert failures >= 1


def test_folder_without_tokenizer_says_what_was_looked_for(tiny: Path, tmp_path: Path) -> None:
    path = _copy(tiny, tmp_path)
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert message.startswith(f"no tokenizer in {path}: looked for tokenizer.json, "
                              "tokenizer_config.json, tokenizer.model"), message
    assert "tokenizer=" in message and "skip_tokenizer_init=True" in message
    assert "--tokenizer" in message and "--skip-tokenizer-init" in message


def test_unreadable_tokenizer_file_names_it(tiny: Path, tmp_path: Path) -> None:
    path = _copy(tiny, tmp_path)
    (path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=rf"cannot load the tokenizer from {path}: "):
        load_tokenizer(path)
