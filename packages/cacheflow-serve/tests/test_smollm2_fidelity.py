"""SmolLM2-135M-Instruct from its GGUF file: greedy tokens identical to HF transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cacheflow_models import default_model_path
from cacheflow_serve import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Hello, my name is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2() -> LLM:
    return LLM(device="cpu", dtype="float32")


def test_batch_matches_hf(smollm2: LLM) -> None:
    path = default_model_path()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = smollm2.generate(PROMPTS, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32)
    tokenizer = smollm2.get_tokenizer()
    for prompt, out in zip(PROMPTS, outputs):
        ids = tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                          pad_token_id=0)
        ref_tokens = ref.sequences[0, len(ids):].tolist()
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        ref_logprobs = [torch.log_softmax(step[0], -1)[t].item()
                        for step, t in zip(ref.logits, ref_tokens)]
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-4
        assert completion.text == tokenizer.decode(ref_tokens, skip_special_tokens=True)


def test_chat_answer_stops_at_end_of_turn(smollm2: LLM) -> None:
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    assert prompt.startswith("<|im_start|>system")
    out = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=64),
                           use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == smollm2.get_tokenizer().convert_tokens_to_ids("<|im_end|>")
    assert "4" in out.text
