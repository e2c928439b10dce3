"""Greedy fidelity against HF transformers: run prompts through our engine and through HF
``generate`` on the same checkpoint and compare the tokens and their logprobs.

The details that make the comparison fair are handled here: both sides ignore EOS (HF's
generation config would otherwise stop early), HF's raw logits are compared (not its processed
scores), and all prompts run through our engine together as one batch, so batching is tested
too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from cacheflow_models.hf_config import build_model_config
from cacheflow_models.tokenizer import load_tokenizer
from cacheflow_runtime import (
    CacheConfig,
    LLMEngine,
    ParallelConfig,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
)

#: The default tolerance on chosen-token logprobs (float32 on CPU).
LOGPROB_TOLERANCE = 1e-4


def prompt_batch(lengths: tuple[int, ...] = (1, 7, 16, 17, 40), seed: int = 1234,
                 vocab_size: int = 259, first_id: int = 3) -> list[list[int]]:
    """Random token-id prompts of the given lengths (the defaults cross the 16-token block
    boundaries of the KV cache), drawn from ids ``first_id`` .. ``vocab_size - 1`` (the byte
    tokenizer's non-special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(first_id, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def run_engine(path: str | Path, prompts: list[list[int]],
               params: SamplingParams | list[SamplingParams], dtype: str = "float32",
               device: str = "cpu", enforce_eager: bool = False,
               engine_out: list[LLMEngine] | None = None, tensor_parallel_size: int = 1,
               **cache: Any) -> list[RequestOutput]:
    """Runs all prompts as one batch through an ``LLMEngine`` on the checkpoint at ``path``
    (float32 on CPU by default) and returns the finished outputs in prompt order.

    ``engine_out``: a list the engine is appended to (to inspect it afterwards);
    ``blocks=N`` sets the number of KV-cache blocks (256). With ``tensor_parallel_size`` > 1
    the ranks are worker processes (gloo on CPU), released before returning.
    """
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    model_config = build_model_config(path, dtype, None, device.split(":")[0])
    engine = LLMEngine(model_config, CacheConfig(num_device_blocks=cache.get("blocks", 256)),
                       SchedulerConfig(max_model_len=model_config.max_model_len),
                       load_tokenizer(path), device, enforce_eager=enforce_eager,
                       parallel_config=ParallelConfig(tensor_parallel_size))
    if engine_out is not None:
        engine_out.append(engine)
    for i, (ids, p) in enumerate(zip(prompts, per_prompt)):
        engine.add_request(str(i), None, p, ids)
    done: dict[str, RequestOutput] = {}
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    finally:
        if tensor_parallel_size > 1:
            engine.shutdown()
    return [done[str(i)] for i in range(len(prompts))]


def hf_greedy(path: str | Path, prompt: list[int], max_new_tokens: int,
              dtype: torch.dtype = torch.float32, device: str = "cpu",
              model: Any = None) -> tuple[list[int], list[float]]:
    """HF transformers' greedy continuation of one prompt (EOS ignored, exactly
    ``max_new_tokens`` tokens) and the chosen tokens' logprobs from its raw logits.

    ``model``: an already loaded HF model to reuse (else it is loaded from ``path``); not for
    models that keep state between calls (dynamic NTK rotary scaling does).
    """
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=max_new_tokens,
                         do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def check_greedy_fidelity(path: str | Path, prompts: list[list[int]], new_tokens: int,
                          tolerance: float = LOGPROB_TOLERANCE) -> float:
    """Asserts greedy token ids identical to HF ``generate`` and chosen-token logprobs within
    ``tolerance``, with all ``prompts`` run together as one batch (float32 on CPU).

    Returns the largest logprob difference seen. The AssertionError names the prompt and the
    first differing position.
    """
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    outputs = run_engine(path, prompts, params)
    worst = 0.0
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        # A fresh HF model per prompt: some keep state across calls (dynamic NTK rotary
        # keeps the frequencies of the longest sequence seen).
        ref_tokens, ref_logprobs = hf_greedy(path, prompt, new_tokens)
        completion = out.outputs[0]
        if completion.token_ids != ref_tokens:
            first = next(j for j, (a, b) in enumerate(zip(completion.token_ids, ref_tokens))
                         if a != b) if len(completion.token_ids) == len(ref_tokens) else None
            raise AssertionError(f"prompt {i} ({len(prompt)} tokens): greedy tokens differ from "
                                 f"HF's at position {first}: ours {completion.token_ids}, "
                                 f"HF {ref_tokens}")
        assert completion.finish_reason == "length", completion.finish_reason
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        diff = max(abs(a - b) for a, b in zip(ours, ref_logprobs))
        assert diff < tolerance, (f"prompt {i}: logprobs differ from HF's by {diff:.3g} "
                                  f"(tolerance {tolerance})")
        worst = max(worst, diff)
    return worst


def top1_agreement(path: str | Path, prompts: list[list[int]], outputs: list[RequestOutput],
                   dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                   label: str = "") -> float:
    """Share of our generated tokens (``outputs[i]``'s first completion, for ``prompts[i]``)
    that HF, run in ``dtype`` on our own sequence, also ranks first given the same context.

    Comparing on the same context measures each step instead of counting every token after a
    first divergence as a miss. Prints each prompt's disagreements and HF's float32
    top-1/top-2 logit margin there (a near-tie that ``dtype`` rounding decides shows as a
    margin of hundredths of a logit), prefixed by ``label``.
    """
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    agree = total = 0
    margins: list[float] = []
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        ours = out.outputs[0].token_ids
        ids = torch.tensor([prompt + ours], device=device)
        with torch.inference_mode():
            theirs = model(ids).logits[0, len(prompt) - 1:-1].float().argmax(-1).tolist()
            top2 = reference(ids).logits[0, len(prompt) - 1:-1].float().topk(2, -1)
        margin = (top2.values[:, 0] - top2.values[:, 1]).tolist()
        margins += margin
        misses = [j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        agree += len(ours) - len(misses)
        total += len(ours)
        first = "none"
        if misses:
            j = misses[0]
            first = (f"at {j}: ours {ours[j]}, HF {theirs[j]}, HF float32 top-2 "
                     f"{top2.indices[j].tolist()}")
        print(f"{label}prompt {i} ({len(prompt)} tokens): {len(misses)} disagreements, first "
              f"{first}; HF float32 margins there {[round(margin[j], 4) for j in misses]}")
    print(f"{label}HF float32 top-1/top-2 margins at the generated positions: min "
          f"{min(margins):.4f}, median {sorted(margins)[len(margins) // 2]:.4f}")
    print(f"{label}top-1 agreement with HF in {dtype}: {agree}/{total} = {agree / total:.4f}")
    return agree / total
