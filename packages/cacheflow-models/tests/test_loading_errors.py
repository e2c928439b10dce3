"""A checkpoint that does not fit the model fails to load with a message naming the file (or the
checkpoint folder) and the tensor: missing, extra and misshapen tensors, and folders holding
only weight formats we do not read."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cacheflow_models import build_model_config
from cacheflow_models.loading import WeightLoadError
from cacheflow_models.testing import save_tiny_checkpoint, tiny_llama_config
from cacheflow_runtime.model_loader import load_model

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA whose weights are split over two safetensors files with an index."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), tiny_llama_config())
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map = {}
    for shard, part in zip(SHARDS, halves):
        save_file({n: tensors[n] for n in part}, path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def _broken_copy(src: Path, dst: Path, shard: str, change: dict[str, torch.Tensor | None]
                 ) -> Path:
    """A copy of ``src`` with tensors of ``shard`` replaced, added, or removed (None)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / shard)
    for name, tensor in change.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, dst / shard, metadata={"format": "pt"})
    return dst


def _shard_of(path: Path, name: str) -> str:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def _load_error(path: Path) -> str:
    with pytest.raises(WeightLoadError) as info:
        load_model(build_model_config(path, "float32"), torch.device("cpu"))
    return str(info.value)


def test_missing_tensor_names_checkpoint_and_tensor(sharded: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"  # part of the fused qkv_proj parameter
    path = _broken_copy(sharded, tmp_path / "ckpt", _shard_of(sharded, name), {name: None})
    message = _load_error(path)
    assert f"'{name}'" in message
    assert "model.layers.1.self_attn.qkv_proj.weight" in message
    assert f"checkpoint {path}" in message


def test_extra_tensor_names_its_file(sharded: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.extra_proj.weight"
    path = _broken_copy(sharded, tmp_path / "ckpt", SHARDS[1], {name: torch.zeros(2, 2)})
    message = _load_error(path)
    assert re.search(rf"no parameter takes: \['{re.escape(name)}'\] "
                     rf"\(in {re.escape(str(path / SHARDS[1]))}\)", message), message
    assert SHARDS[0] not in message


def test_misshapen_tensor_names_its_file(sharded: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    shard = _shard_of(sharded, name)
    path = _broken_copy(sharded, tmp_path / "ckpt", shard, {name: torch.zeros(64, 96)})
    message = _load_error(path)
    assert f"checkpoint tensor '{name}' (in {path / shard})" in message
    assert "(64, 96)" in message


@pytest.mark.parametrize("weights_file, what", [("flax_model.msgpack", "Flax"),
                                                ("tf_model.h5", "TensorFlow")])
def test_unreadable_format_names_folder_and_file(sharded: Path, tmp_path: Path,
                                                 weights_file: str, what: str) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(sharded / "config.json", path)
    (path / weights_file).write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError) as info:
        build_model_config(path)
    message = str(info.value)
    assert f"no checkpoint found in {path}" in message
    assert f"{weights_file} is a {what}" in message
