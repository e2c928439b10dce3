"""FP8 KV-cache fidelity on a GPU: greedy tokens of the engine with ``cache_dtype="fp8"`` against
the same engine with the model-dtype cache, on a random LLaMA with 7B-shaped layers.

    python packages/cacheflow-serve/benchmarks/fp8_kv_fidelity.py --layers 8 --prompts 64

Reports the share of generated positions before each prompt's first divergence (positions after
a divergence continue from different prefixes, so they are not compared), the first divergence
of each prompt that diverges, and the KV-cache blocks each engine sized from the same memory.
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cacheflow_models import build_model_config, load_tokenizer
from cacheflow_models.testing import BYTE_VOCAB_SIZE, byte_tokenizer
from cacheflow_runtime import CacheConfig, LLMEngine, SamplingParams, SchedulerConfig


class _BlockLog(logging.Handler):
    """Catches the engine's "KV cache: N device blocks" line."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"KV cache: (\d+) device blocks", record.getMessage())
        if found:
            self.blocks.append(int(found.group(1)))


def _generate(path: Path, prompts: list[list[int]], cache_dtype: str, tokens: int,
              log: _BlockLog) -> list[list[int]]:
    model_config = build_model_config(path, "float16", None, "cuda")
    engine = LLMEngine(model_config, CacheConfig(cache_dtype=cache_dtype,
                                                 gpu_memory_utilization=0.45),
                       SchedulerConfig(max_num_seqs=64, max_model_len=model_config.max_model_len),
                       load_tokenizer(path), "cuda")
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), None, params, ids)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return [done[str(i)] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args(argv)
    log = _BlockLog()
    logging.getLogger().addHandler(log)
    logging.getLogger().setLevel(logging.INFO)
    config = LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=args.layers, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, BYTE_VOCAB_SIZE, (int(n),), generator=gen).tolist()
               for n in torch.randint(4, 200, (args.prompts,), generator=gen)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        del model
        torch.cuda.empty_cache()
        auto = _generate(path, prompts, "auto", args.tokens, log)
        fp8 = _generate(path, prompts, "fp8", args.tokens, log)
    agreed = 0
    divergences = []
    for i, (a, b) in enumerate(zip(auto, fp8)):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agreed += first
        if first < len(a):
            divergences.append((i, first))
    total = sum(len(a) for a in auto)
    print(f"7B-shaped layers x {args.layers}, fp16 weights, {args.prompts} prompts x "
          f"{args.tokens} greedy tokens")
    print(f"KV cache blocks (auto, fp8) from the same memory: {log.blocks}")
    print(f"positions before the first divergence: {agreed}/{total} = {agreed / total:.2%}")
    print(f"prompts that diverge: {len(divergences)}; first divergences (prompt, position): "
          f"{divergences[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
