"""Random-weight checkpoints for the benchmarks: the presets' shapes, --hf-config parsing, and a
written checkpoint that the engine and HF transformers load to the same greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM
from cacheflow_serve import random_checkpoint as rc
from cacheflow_serve.bench_hf import HFGenerator

ONE_TORCH_THREAD = True  # see conftest.py


# Parameter counts of the published models (LLaMA-2-7B / 13B, TinyLlama-1.1B) and of the tiny
# preset by hand: embeddings 512x64 twice, per layer q,o 64x64, k,v 64x32, MLP 3x64x128, 2 norms.
@pytest.mark.parametrize("name, parameters", [
    ("llama-7b", 6_738_415_616),
    ("llama-13b", 13_015_864_320),
    ("tinyllama-1.1b", 1_100_048_384),
    ("tiny", 2 * 512 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64),
])
def test_preset_shapes_have_the_published_parameter_counts(name: str, parameters: int) -> None:
    config = rc.build_hf_config(rc.hf_config_fields(name))
    assert rc.parameter_count(config) == parameters
    assert config.architectures == ["LlamaForCausalLM"]


def test_llama_7b_preset_is_llama_2_7b() -> None:
    fields = rc.hf_config_fields("llama-7b")
    assert {k: fields[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                   "num_key_value_heads", "intermediate_size", "vocab_size")} \
        == dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)
    assert set(rc.PRESET_DESCRIPTIONS) == set(rc.PRESETS)


def test_hf_config_from_inline_json_file_and_folder(tmp_path: Path) -> None:
    inline = rc.hf_config_fields('{"preset": "tiny", "num_hidden_layers": 3}')
    assert inline["num_hidden_layers"] == 3 and inline["hidden_size"] == 64
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32,
                                                      "num_attention_heads": 2}))
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        fields = rc.hf_config_fields(spec)
        assert fields["model_type"] == "qwen2"
        config = rc.build_hf_config(fields)
        assert config.architectures == ["Qwen2ForCausalLM"]  # filled in from model_type
        assert config.hidden_size == 32


@pytest.mark.parametrize("spec, message", [
    ("llama-70b", "--hf-config 'llama-70b' is neither a preset (llama-7b, llama-13b, "
                  "tinyllama-1.1b, tiny), a config.json path nor a JSON object"),
    ("{not json", "--hf-config is not valid JSON: "),
    ('{"hidden_size": 8}', "--hf-config: the inline JSON has no \"model_type\" (or \"preset\")"),
    ('{"preset": "gpt-5"}', "--hf-config: unknown preset 'gpt-5' in the inline JSON"),
])
def test_bad_hf_config_names_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        rc.hf_config_fields(spec)
    assert str(info.value).startswith(message)


def test_unknown_model_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="model_type 'no-such-model' is unknown to transformers"):
        rc.build_hf_config({"model_type": "no-such-model"})


@pytest.mark.parametrize("override, message", [
    ({"hidden_size": 65}, "--hf-config: invalid llama config: "),
    ({"num_attention_heads": 3}, "--hf-config: invalid llama config: "),
    ({"hidden_size": "x"}, "--hf-config: invalid llama config: "),
    ({"vocab_size": -5}, "--hf-config: no llama model has this config: "),
])
def test_config_no_model_can_have_is_a_clear_error(override: dict, message: str) -> None:
    """Whatever transformers' validators or the model's construction raise becomes a ValueError
    that names --hf-config (the CLI prints it as a usage error, not a traceback)."""
    fields = {**rc.hf_config_fields("tiny"), **override}
    with pytest.raises(ValueError) as info:
        rc.build_hf_config(fields)
    assert str(info.value).startswith(message)


def test_vocab_tokenizer_covers_the_vocabulary() -> None:
    tok = rc.vocab_tokenizer(300)
    assert len(tok) == 300
    assert tok.decode([300 - 1]) == "<|299|>"
    ids = tok.encode("héllo", add_special_tokens=False)
    assert len(ids) == 6 and all(3 <= i < 259 for i in ids)  # one token per UTF-8 byte
    assert tok.decode(ids) == "héllo"
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        rc.vocab_tokenizer(100)


def test_written_checkpoint_is_sharded_typed_and_tied(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rc, "SHARD_BYTES", 40_000)
    config = rc.build_hf_config(rc.hf_config_fields('{"preset": "tiny", '
                                                    '"tie_word_embeddings": true}'))
    path = rc.write_random_checkpoint(config, tmp_path / "m", torch.float16,
                                      torch.device("cpu"), seed=1, progress=False)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    assert set(index["weight_map"]) == set(rc.meta_tensors(config))
    tensors = {}
    for name in files:
        with safe_open(str(path / name), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64, dtype=torch.float16))
    q = tensors["model.layers.0.self_attn.q_proj.weight"].float()
    assert q.shape == (64, 64) and 0.015 < q.std().item() < 0.025  # initializer_range 0.02
    assert json.loads((path / "config.json").read_text())["dtype"] == "float16"


def test_engine_and_hf_read_the_checkpoint_alike(tmp_path: Path) -> None:
    """Greedy tokens of the engine and of the HF baseline (left-padded batch of two lengths)
    are identical in float32: both read every tensor under the same name."""
    config = rc.build_hf_config(rc.hf_config_fields("tiny"))
    path = rc.write_random_checkpoint(config, tmp_path / "m", torch.float32,
                                      torch.device("cpu"), seed=3, progress=False)
    prompts = [[5, 77, 300, 12, 9, 41], [400, 8, 33]]
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_blocks=16)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = HFGenerator(path, torch.float32, torch.device("cpu"))
    assert hf.generate(prompts, 6) == [o.outputs[0].token_ids for o in outs]
