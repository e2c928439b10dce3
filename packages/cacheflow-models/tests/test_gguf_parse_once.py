"""A GGUF checkpoint is parsed once (config, tokenizer, generation defaults and weights share the
parse), and the config and tokenizer built from that parse equal what transformers builds when
it reads the file itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from test_gpt2_gguf import write_gguf
from transformers import AutoConfig, AutoTokenizer

from cacheflow_models import (
    build_model_config,
    load_generation_defaults,
    load_hf_config,
    load_tokenizer,
)
from cacheflow_models.testing import byte_tokenizer, save_tiny_checkpoint, tiny_gpt2_config
from cacheflow_runtime import weights
from cacheflow_runtime.weights import iterate_weights

TEXTS = ["Hello world!", "  two  spaces\nand a newline", "ünïcödé 123"]


def _llama_metadata_gguf(path: Path) -> Path:
    """A LLaMA GGUF with a byte-level BPE vocabulary, as llama.cpp writes SmolLM2 (metadata and
    one norm tensor; enough for the config and the tokenizer)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    vocab = byte_tokenizer().get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama_metadata_gguf(tmp_path_factory.mktemp("llama_gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def gpt2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_gpt2_config(n_positions=1024)
    return write_gguf(save_tiny_checkpoint(tmp_path_factory.mktemp("gpt2"), config), config)


def _transformers_config(path: Path) -> Any:
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                      local_files_only=True)


@pytest.mark.parametrize("which", ["llama_gguf", "gpt2_gguf"])
def test_config_equals_transformers(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    ours = load_hf_config(path)
    assert ours.to_dict() == _transformers_config(path).to_dict()
    assert ours.model_type == ("llama" if which == "llama_gguf" else "gpt2")


def test_tokenizer_equals_transformers(llama_gguf: Path) -> None:
    ours = load_tokenizer(llama_gguf)
    theirs = AutoTokenizer.from_pretrained(str(llama_gguf.parent), gguf_file=llama_gguf.name,
                                           local_files_only=True)
    assert type(ours) is type(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 0)


def test_one_parse_for_config_tokenizer_defaults_and_weights(
        gpt2_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parses: list[Path] = []
    original = weights.GGUFFile.__init__

    def counting(self: weights.GGUFFile, file: Path) -> None:
        parses.append(file)
        original(self, file)

    monkeypatch.setattr(weights.GGUFFile, "__init__", counting)
    weights._gguf_cache.clear()
    config = build_model_config(gpt2_gguf)
    load_tokenizer(gpt2_gguf)
    assert load_generation_defaults(gpt2_gguf) == {}
    names = [name for name, _ in iterate_weights(gpt2_gguf)]
    assert parses == [gpt2_gguf.resolve()]
    assert config.num_layers == 2 and "token_embd.weight" in names
    # A changed file is parsed again (the cache is keyed by size and modification time).
    stat = gpt2_gguf.stat()
    os.utime(gpt2_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_hf_config(gpt2_gguf)
    assert len(parses) == 2
