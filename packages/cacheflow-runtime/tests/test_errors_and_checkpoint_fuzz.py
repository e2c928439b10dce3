"""User errors: the error hierarchy, typed SamplingParams / config validation, and checkpoint
readers that turn every truncated or corrupted file into a CheckpointError naming it (fuzzed:
random truncations and flipped header bytes)."""

from __future__ import annotations

import importlib.util
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cacheflow_runtime import (
    CacheConfig,
    CacheflowUserError,
    CheckpointError,
    InvalidArgumentError,
    InvalidRequestError,
    SamplingParams,
    SchedulerConfig,
)
from cacheflow_runtime.config import ParallelConfig
from cacheflow_runtime.errors import check_text
from cacheflow_runtime.weights import iterate_weights, read_gguf_metadata


def test_every_user_error_is_a_value_error() -> None:
    for cls in (InvalidArgumentError, CheckpointError, InvalidRequestError):
        assert issubclass(cls, CacheflowUserError) and issubclass(cls, ValueError)
    assert CheckpointError("x", file=Path("/a/b")).file == "/a/b"
    err = InvalidRequestError("x", param="prompt", code="context_length_exceeded")
    assert (err.param, err.code) == ("prompt", "context_length_exceeded")


def test_check_text_names_the_lone_surrogate() -> None:
    check_text("fine ✓ text", "prompt")
    with pytest.raises(InvalidRequestError, match=r"^prompt is not valid Unicode: lone "
                                                  r"surrogate '\\ud800' at index 1$") as info:
        check_text("a\ud800b", "prompt")
    assert info.value.param == "prompt"


# ------------------------------------------------------------------------ SamplingParams types

BAD_TYPES: list[tuple[dict[str, Any], str, str]] = [
    (dict(temperature="hot"), "temperature", "a number, got 'hot'"),
    (dict(temperature=True), "temperature", "a number, got True"),
    (dict(temperature=float("nan")), "temperature", "a finite number >= 0, got nan"),
    (dict(top_p=None), "top_p", "a number, got None"),
    (dict(n=True), "n", "an integer, got True"),
    (dict(n=2.0), "n", "an integer, got 2.0"),
    (dict(max_tokens=True), "max_tokens", "an integer or None, got True"),
    (dict(max_tokens="16"), "max_tokens", "an integer or None, got '16'"),
    (dict(best_of=False), "best_of", "an integer or None, got False"),
    (dict(seed=1.5), "seed", "an integer or None, got 1.5"),
    (dict(logprobs=True), "logprobs", "an integer or None, got True"),
    (dict(top_k="5"), "top_k", "an integer, got '5'"),
    (dict(stop=123), "stop", "a non-empty string or a list of non-empty strings, got 123"),
    (dict(stop=["ok", 5]), "stop", "a non-empty string or a list of non-empty strings, "
                                   "got ['ok', 5]"),
    (dict(stop="a\ud800"), "stop", "a non-empty string or a list of non-empty strings of valid "
                                   "Unicode (no lone surrogates), got 'a\\ud800'"),
    (dict(stop_token_ids=[1.7]), "stop_token_ids", "a list of integer token ids, got [1.7]"),
    (dict(stop_token_ids=[True]), "stop_token_ids", "a list of integer token ids, got [True]"),
    (dict(stop_token_ids=7), "stop_token_ids", "a list of integer token ids, got 7"),
    (dict(logit_bias={"5": 1.0}), "logit_bias",
     "None or a dict of integer token id -> number, got {'5': 1.0}"),
    (dict(logit_bias=[(5, 1.0)]), "logit_bias",
     "None or a dict of integer token id -> number, got [(5, 1.0)]"),
    (dict(logit_bias={5: 101}), "logit_bias",
     "a dict of non-negative token ids to biases in [-100, 100], got {5: 101.0}"),
    (dict(logit_bias={-1: 1}), "logit_bias",
     "a dict of non-negative token ids to biases in [-100, 100], got {-1: 1.0}"),
    (dict(logit_bias={3: float("nan")}), "logit_bias",
     "a dict of non-negative token ids to biases in [-100, 100], got {3: nan}"),
    (dict(allowed_token_ids=[]), "allowed_token_ids",
     "None or a non-empty list of integer token ids, got []"),
    (dict(allowed_token_ids=[1, "2"]), "allowed_token_ids",
     "None or a non-empty list of integer token ids, got [1, '2']"),
    (dict(allowed_token_ids=[3, -1]), "allowed_token_ids", "non-negative token ids, got [3, -1]"),
    (dict(bad_words="no"), "bad_words", "a list of non-empty strings, got 'no'"),
    (dict(bad_words=["ok", ""]), "bad_words", "a list of non-empty strings, got ['ok', '']"),
    (dict(truncate_prompt_tokens=2.0), "truncate_prompt_tokens", "an integer or None, got 2.0"),
    (dict(ignore_eos="yes"), "ignore_eos", "True or False, got 'yes'"),
    (dict(skip_special_tokens=1), "skip_special_tokens", "True or False, got 1"),
]


@pytest.mark.parametrize("kwargs,field,expected", BAD_TYPES,
                         ids=[f"{f}={next(iter(k.values()))!r}" for k, f, _ in BAD_TYPES])
def test_sampling_params_types_are_checked(kwargs: dict[str, Any], field: str,
                                           expected: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == f"SamplingParams.{field} must be {expected}"
    assert info.value.field == f"SamplingParams.{field}"


def test_sampling_params_take_numpy_integers_and_int_floats() -> None:
    params = SamplingParams(n=np.int64(2), max_tokens=np.int32(5), temperature=1,
                            stop_token_ids=(np.int64(7), 9), stop="x")
    assert (params.n, params.max_tokens, params.best_of) == (2, 5, 2)
    assert type(params.n) is int and type(params.max_tokens) is int
    assert params.stop_token_ids == [7, 9] and all(type(t) is int for t in params.stop_token_ids)
    assert params.stop_strings == ["x"]
    for keep in (0, -2):
        with pytest.raises(InvalidArgumentError, match=r"SamplingParams.truncate_prompt_tokens "
                                                       r"must be None, -1 \(max_model_len\) or "
                                                       rf"an integer >= 1, got {keep}"):
            SamplingParams(truncate_prompt_tokens=keep)
    ids = list(range(10))
    assert SamplingParams(truncate_prompt_tokens=3).truncate_prompt(ids, 8) == [7, 8, 9]
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt(ids, 8) == ids[2:]
    assert SamplingParams(truncate_prompt_tokens=50).truncate_prompt(ids, 8) == ids
    assert SamplingParams().truncate_prompt(ids, 8) == ids
    biased = SamplingParams(logit_bias={np.int64(3): np.float32(-2.5), 4: 7})
    assert biased.logit_bias == {3: -2.5, 4: 7.0}
    assert all(type(t) is int and type(v) is float for t, v in biased.logit_bias.items())


@pytest.mark.parametrize("make,message", [
    (lambda: CacheConfig(block_size=7), "block_size must be 8, 16 or 32, got 7"),
    (lambda: CacheConfig(block_size=True), "block_size must be 8, 16 or 32, got True"),
    (lambda: CacheConfig(swap_space="4"), "swap_space must be a number >= 0, got '4'"),
    (lambda: CacheConfig(gpu_memory_utilization=float("nan")),
     "gpu_memory_utilization must be a number in (0, 1], got nan"),
    (lambda: CacheConfig(num_device_blocks=True),
     "kv_cache_blocks must be a positive integer or None, got True"),
    (lambda: SchedulerConfig(max_num_seqs=True), "max_num_seqs must be a positive integer, "
                                                 "got True"),
    (lambda: SchedulerConfig(max_num_batched_tokens="many"),
     "max_num_batched_tokens must be an integer or None, got 'many'"),
    (lambda: SchedulerConfig(preemption_mode=["swap"]),
     "preemption_mode must be one of ('recompute', 'swap'), got ['swap']"),
])
def test_config_arguments_are_typed(make: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        make()
    assert str(info.value) == message


def test_ray_backend_without_ray_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for the Ray executor where Ray is not installed is refused by the configuration,
    before anything loads, with the install hint (it was an ImportError out of the executor)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(InvalidArgumentError, match=r"needs Ray.*pip install") as info:
        ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="ray")
    assert info.value.field == "distributed_executor_backend"
    assert ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="mp")


def test_default_token_budget_covers_every_running_request() -> None:
    """The default step budget is never below max_num_seqs (a decode token each); a budget the
    user gives is kept as given."""
    assert SchedulerConfig().max_num_batched_tokens == 2048
    assert SchedulerConfig(max_num_seqs=4096).max_num_batched_tokens == 4096
    assert SchedulerConfig(max_num_seqs=3000, enable_chunked_prefill=False,
                           max_model_len=1024).max_num_batched_tokens == 3000
    assert SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=16).max_num_batched_tokens == 16


# ------------------------------------------------------------------------ checkpoint fuzzing


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(16, 8, generator=g),
            "b.weight": torch.randn(8, generator=g).to(torch.float16),
            "c.bias": torch.randn(3, 5, generator=g).to(torch.bfloat16)}


def _write_safetensors(path: Path) -> Path:
    file = path / "model.safetensors"
    save_file(_state(), file)
    return file


def _write_bin(path: Path) -> Path:
    file = path / "pytorch_model.bin"
    torch.save(_state(), file)
    return file


def _write_gguf(path: Path) -> Path:
    file = path / "tiny.gguf"
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(file, arch="llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    writer.add_tensor("token_embd.weight", rng.standard_normal((7, 32)).astype(np.float32))
    quant = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32),
                                 gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_down.weight", quant,
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


WRITERS = {"safetensors": _write_safetensors, "bin": _write_bin, "gguf": _write_gguf}


def _read_all(file: Path) -> None:
    for _ in iterate_weights(file):
        pass
    if file.suffix == ".gguf":
        read_gguf_metadata(file)


def _fails_naming(file: Path) -> bool:
    """True when reading ``file`` raises a CheckpointError naming it, False when it reads
    (a flipped byte can land where any value is valid); anything else fails the test."""
    try:
        _read_all(file)
    except CheckpointError as exc:
        assert str(file) in str(exc) and exc.file == str(file), str(exc)
        return True
    return False


def _header_size(fmt: str, data: bytes) -> int:
    """Bytes of the file that are header (names, shapes, offsets), not tensor data."""
    if fmt == "safetensors":
        return 8 + int.from_bytes(data[:8], "little")
    if fmt == "bin":  # a zip: the pickle and the directory
        return len(data)
    return min(len(data), 512)


def _payload_end(fmt: str, file: Path) -> int:
    """Where the last byte the reader needs ends (GGUF files end in alignment padding)."""
    if fmt != "gguf":
        return file.stat().st_size
    reader = gguf.GGUFReader(file)
    return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_truncated_checkpoint_files_name_the_file(tmp_path: Path, fmt: str) -> None:
    file = WRITERS[fmt](tmp_path)
    data = file.read_bytes()
    _read_all(file)  # the intact file reads
    end = _payload_end(fmt, file)
    rng = random.Random(f"truncate-{fmt}")
    cuts = sorted({0, 1, 7, end // 2, end - 1, *(rng.randrange(end) for _ in range(12))})
    for cut in cuts:
        file.write_bytes(data[:cut])
        assert _fails_naming(file), f"{fmt} truncated to {cut} of {len(data)} bytes read fine"


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_flipped_header_bytes_never_escape_as_other_errors(tmp_path: Path, fmt: str) -> None:
    file = WRITERS[fmt](tmp_path)
    data = file.read_bytes()
    rng = random.Random(f"flip-{fmt}")
    failures = 0
    trials = 40
    for _ in range(trials):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(_header_size(fmt, data))] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(corrupt))
        failures += _fails_naming(file)
    assert failures >= trials // 4  # most flips break the header; some land in free bytes


def test_a_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    file = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(file, "w") as archive:
        archive.writestr("hello.txt", "not a state dict")
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        _read_all(file)


def test_top_k_0_is_off_like_minus_1() -> None:
    """vLLM: "Set to 0 (or -1) to consider all tokens"; stored as -1 for everything
    downstream."""
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(top_k=np.int64(0)).top_k == -1
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingParams(top_k=3).top_k == 3
    assert SamplingParams(top_k=0, use_beam_search=True, best_of=2, temperature=0).top_k == -1
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(top_k=-2)
    assert str(info.value) == "SamplingParams.top_k must be -1 or 0 (off) or an integer >= 1, " \
                              "got -2"


@pytest.mark.parametrize("kwargs, field, value", [
    (dict(n=2), "n", 2),  # best_of defaults to n: the error names what was set
    (dict(n=2, best_of=2), "n", 2),
    (dict(n=1, best_of=3), "best_of", 3),
])
def test_greedy_sampling_errors_name_the_field_set(kwargs: dict[str, Any], field: str,
                                                   value: int) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(temperature=0, **kwargs)
    assert str(info.value) == (f"SamplingParams.{field} must be 1 with greedy sampling "
                               f"(temperature 0), got {value}")
    assert info.value.field == f"SamplingParams.{field}"
