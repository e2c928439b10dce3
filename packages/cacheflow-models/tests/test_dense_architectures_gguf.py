"""Qwen3, Gemma 2, Gemma 3 and Phi-3 from GGUF files written the way llama.cpp's converter lays
them out (its tensor names, Gemma's norm weights stored as 1 + weight, Phi-3's fused attn_qkv
and ffn_up): greedy tokens identical to HF transformers loading the same file, logprobs within
1e-4; the same parameters as the safetensors checkpoint the file came from (but for Gemma's
norms, which the + 1 / - 1 round trip rounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from cacheflow_models import build_model_config
from cacheflow_models.testing import (
    byte_tokenizer,
    checkpoint_tensors,
    load_tiny_model,
    run_engine,
    save_tiny_checkpoint,
)
from cacheflow_runtime import SamplingParams

from dense_testutil import (
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_phi3_config,
    tiny_qwen3_config,
)

NEW_TOKENS = 16

# Shapes whose config fields that transformers does not read from GGUF metadata equal the config
# class's defaults (Qwen3's head_dim 128; Gemma's query_pre_attn_scalar 256 and soft caps
# 50 / 30; Phi-3's original_max_position_embeddings 4096, no rope scaling).
CONFIGS: dict[str, tuple[gguf.MODEL_ARCH, Any]] = {
    "qwen3": (gguf.MODEL_ARCH.QWEN3, lambda: tiny_qwen3_config(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        tie_word_embeddings=False, max_position_embeddings=128)),
    "gemma2": (gguf.MODEL_ARCH.GEMMA2, lambda: tiny_gemma2_config(
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        max_position_embeddings=128)),
    "gemma3": (gguf.MODEL_ARCH.GEMMA3, lambda: tiny_gemma3_config(
        query_pre_attn_scalar=256, final_logit_softcapping=None, rope_scaling=None,
        num_hidden_layers=6, sliding_window_pattern=6, max_position_embeddings=128,
        tie_word_embeddings=False)),
    "phi3": (gguf.MODEL_ARCH.PHI3, lambda: tiny_phi3_config(max_position_embeddings=128)),
}


def write_gguf(checkpoint: Path, arch: gguf.MODEL_ARCH, config: Any) -> Path:
    """The safetensors checkpoint as an F32 GGUF file with llama.cpp's names and metadata."""
    path = checkpoint / f"tiny-{arch.name.lower()}-f32.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny-{arch.name.lower()}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = (config.rope_parameters.get("full_attention", config.rope_parameters)
             .get("rope_theta"))
    writer.add_rope_freq_base(theta)
    if getattr(config, "sliding_window", None) is not None:
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = byte_tokenizer().get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(config.pad_token_id)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    gemma = arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)
    for name, tensor in checkpoint_tensors(checkpoint):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if gemma and name.endswith("norm.weight"):
            tensor = tensor + 1
        writer.add_tensor(gguf_name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_gguf(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch, make_config = CONFIGS[request.param]
    config = make_config()
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), config)
    return request.param, write_gguf(checkpoint, arch, config)


def _hf_greedy(gguf_path: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def test_gguf_config_resolves_to_the_port(tiny_gguf: tuple[str, Path]) -> None:
    name, path = tiny_gguf
    expected = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}[name]
    config = build_model_config(path)
    assert config.architecture == expected
    assert config.weights_format == "gguf"


def test_same_parameters_as_safetensors(tiny_gguf: tuple[str, Path]) -> None:
    name, path = tiny_gguf
    ours = dict(load_tiny_model(path).named_parameters())
    reference = dict(load_tiny_model(path.parent).named_parameters())
    assert ours.keys() == reference.keys()
    for param_name, param in ours.items():
        if name.startswith("gemma") and param_name.endswith("norm.weight"):
            torch.testing.assert_close(param, reference[param_name], rtol=0, atol=3e-7)
        else:
            assert torch.equal(param, reference[param_name]), param_name


def test_greedy_matches_hf_gguf(tiny_gguf: tuple[str, Path],
                                prompt_batch: list[list[int]]) -> None:
    _, path = tiny_gguf
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    prompts = prompt_batch[1:]
    outputs = run_engine(path, prompts, params)
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = _hf_greedy(path, prompt)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-4
