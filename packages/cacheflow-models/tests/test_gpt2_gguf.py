"""GPT-2 from a GGUF file (llama.cpp's names and layouts): greedy tokens identical to HF
transformers loading the same file, logprobs within 1e-4; the same parameters as the
safetensors checkpoint the file was written from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cacheflow_models.testing import (
    assert_same_parameters,
    byte_tokenizer,
    checkpoint_tensors,
    load_tiny_model,
    run_engine,
    save_tiny_checkpoint,
    tiny_gpt2_config,
)
from cacheflow_runtime import SamplingParams

NEW_TOKENS = 16
GGUF_NAME = "tiny-gpt2-f32.gguf"

# HF GPT-2 names -> llama.cpp names (per layer, then the rest).
_LAYER_NAMES = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
_TOP_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
# Conv1D weights, [in, out] in HF and [out, in] in llama.cpp's GPT-2 files.
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def _gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.removeprefix("transformer.").rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    _, layer, module = stem.split(".", 2)
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"


def write_gguf(checkpoint: Path, config: Any, with_output: bool = True) -> Path:
    """Writes the safetensors checkpoint as an F32 GGUF file the way llama.cpp's converter
    lays out GPT-2 (transposed projections, output.weight copied from token_embd).

    Without ``with_output`` the file has no output.weight, and transformers ties the LM head.
    """
    path = checkpoint / GGUF_NAME
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name("tiny-gpt2")
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = byte_tokenizer().get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
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

    for name, tensor in checkpoint_tensors(checkpoint):
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        gguf_name = _gguf_name(name)
        writer.add_tensor(gguf_name, tensor.contiguous().numpy())
        if gguf_name == "token_embd.weight" and with_output:
            writer.add_tensor("output.weight", tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # GPT-2's GGUF metadata gives no n_positions (transformers maps context_length to n_ctx), so
    # the config keeps GPT2Config's default of 1024 positions.
    config = tiny_gpt2_config(n_positions=1024)
    return write_gguf(save_tiny_checkpoint(tmp_path_factory.mktemp("gpt2_gguf"), config), config)


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


def test_same_parameters_as_safetensors(tmp_path: Path) -> None:
    config = tiny_gpt2_config(n_positions=1024)
    tied = write_gguf(save_tiny_checkpoint(tmp_path, config), config, with_output=False)
    # The folder holds the safetensors checkpoint too, which wins when the folder is given.
    assert_same_parameters(load_tiny_model(tied), load_tiny_model(tmp_path))


def test_untied_output_weight(tiny_gguf: Path) -> None:
    # llama.cpp's files carry output.weight (a copy of token_embd): transformers then unties the
    # LM head, and so do we, loading it from output.weight.
    model = load_tiny_model(tiny_gguf)
    assert not model.tie_word_embeddings
    reference = dict(load_tiny_model(tiny_gguf.parent).named_parameters())
    for name, param in model.named_parameters():
        expected = reference["transformer.wte.weight" if name == "lm_head.weight" else name]
        assert torch.equal(param, expected), name


def test_gguf_tokenizer_loads(tiny_gguf: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert tok.get_vocab() == byte_tokenizer().get_vocab()


def test_greedy_matches_hf_gguf(tiny_gguf: Path, prompt_batch: list[list[int]]) -> None:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    prompts = prompt_batch[:4]
    outputs = run_engine(tiny_gguf, prompts, params)
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = _hf_greedy(tiny_gguf, prompt)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-4
