"""Helpers of the cacheflow-models tests: run our engine, run HF transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from cacheflow_models import build_model_config, load_tokenizer
from cacheflow_runtime import CacheConfig, LLMEngine, RequestOutput, SamplingParams, SchedulerConfig


def run_engine(path: Path, prompts: list[list[int]],
               params: SamplingParams | list[SamplingParams],
               dtype: str = "float32", device: str = "cpu",
               **cache: Any) -> list[RequestOutput]:
    """Runs all prompts as one batch through an engine (float32 on CPU by default).

    Outputs come back in prompt order.
    """
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    model_config = build_model_config(path, dtype, None, device.split(":")[0])
    engine = LLMEngine(model_config, CacheConfig(num_device_blocks=cache.get("blocks", 256)),
                       SchedulerConfig(max_model_len=model_config.max_model_len),
                       load_tokenizer(path), device)
    for i, (ids, p) in enumerate(zip(prompts, per_prompt)):
        engine.add_request(str(i), None, p, ids)
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[str(i)] for i in range(len(prompts))]


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int,
              dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> tuple[list[int], list[float]]:
    """HF transformers' greedy continuation of one prompt and the chosen tokens' logprobs."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=max_new_tokens,
                         do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens)]
    return tokens, logprobs
