"""Our engine against HF transformers on one checkpoint: greedy tokens, their logprobs, and the
hidden state after each decoder layer (to name the layer where the two part ways)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from cacheflow_models.hf_config import split_gguf_path
from cacheflow_runtime import CacheConfig, LLMEngine, SamplingParams, SchedulerConfig
from cacheflow_runtime.config import ModelConfig

BLOCK_SIZE = 16


@dataclass
class Greedy:
    """A greedy continuation and the logprob of each chosen token."""

    tokens: list[int]
    logprobs: list[float]


def build_engine(model_config: ModelConfig, tokenizer: Any, prompts: list[list[int]],
                 max_tokens: int, device: str) -> LLMEngine:
    """An engine with just enough KV blocks for ``prompts`` and ``max_tokens`` more each.

    Prefix caching is off: the per-layer comparison needs every prompt token computed again.
    """
    blocks = sum(math.ceil((len(p) + max_tokens) / BLOCK_SIZE) for p in prompts) + 4
    return LLMEngine(model_config, CacheConfig(block_size=BLOCK_SIZE, num_device_blocks=blocks,
                                               num_cpu_blocks=0, enable_prefix_caching=False),
                     SchedulerConfig(max_model_len=model_config.max_model_len), tokenizer, device)


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[Greedy]:
    """Greedy continuations of all ``prompts``, run as one batch (EOS ignored)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    for i, ids in enumerate(prompts):
        engine.add_request(f"check-{i}", None, params, ids)
    done: dict[str, Greedy] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                done[out.request_id] = Greedy(
                    list(c.token_ids), [lp[t] for lp, t in zip(c.logprobs or [], c.token_ids)])
    return [done[f"check-{i}"] for i in range(len(prompts))]


def load_hf_model(path: str, dtype: torch.dtype, device: str) -> nn.Module:
    """The HF transformers model of the checkpoint (GGUF files are dequantized by HF)."""
    from transformers import AutoModelForCausalLM

    folder, gguf_file = split_gguf_path(path)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=dtype,
                                                 local_files_only=True)
    return model.to(device).eval()


def reset_dynamic_rope(model: nn.Module) -> None:
    """Puts HF's dynamic rotary embeddings back in their freshly loaded state.

    HF's dynamic NTK rotary keeps the frequencies of the longest sequence it has seen and uses
    them for any later sequence that is shorter but still past the trained length, so a reused
    model rotates a prompt differently depending on what ran before. The reference is a fresh
    model per prompt (what our engine gives every sequence); this avoids reloading it.
    """
    for module in model.modules():
        if all(hasattr(module, a) for a in ("original_inv_freq", "inv_freq",
                                            "max_seq_len_cached", "original_max_seq_len")):
            module.inv_freq = module.original_inv_freq.clone()
            module.max_seq_len_cached = module.original_max_seq_len


@torch.inference_mode()
def hf_greedy(model: nn.Module, prompt: list[int], max_tokens: int) -> Greedy:
    """HF's greedy continuation, step by step with its KV cache (no generation config applied)."""
    reset_dynamic_rope(model)
    device = next(model.parameters()).device
    # transformers 5.x calls the KV cache ``cache`` (argument and output), 4.x past_key_values.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    out = model(torch.tensor([prompt], device=device), use_cache=True)
    tokens: list[int] = []
    logprobs: list[float] = []
    for step in range(max_tokens):
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        token = int(torch.argmax(logp))
        tokens.append(token)
        logprobs.append(float(logp[token]))
        if step + 1 < max_tokens:
            out = model(torch.tensor([[token]], device=device), use_cache=True,
                        **{cache_arg: getattr(out, cache_arg)})
    return Greedy(tokens, logprobs)


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's list of ``num_layers`` decoder layers (the first such ModuleList)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"found no list of {num_layers} decoder layers in {type(model).__name__}")


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def engine_layer_states(engine: LLMEngine, prompt: list[int],
                        num_layers: int) -> list[torch.Tensor]:
    """Our hidden states for ``prompt`` [tokens, hidden]: after each decoder layer but the
    last, then the model's output (the last layer followed by the final norm), as HF's
    ``hidden_states[1:]`` has them. Forward hooks, removed afterwards: the hot path is untouched.
    A model that hands residual sums from layer to layer (``carries_residual``, LLaMA-family
    blocks with fused add-and-norm) runs its layers as plain modules meanwhile, so that each
    layer's output exists to be captured (the same values on the CPU).
    """
    model = engine.get_model()
    carrying = [m for m in model.modules() if getattr(m, "carries_residual", False)]
    captured: list[torch.Tensor] = []
    final: list[torch.Tensor] = []

    def keep_layer(_module: nn.Module, _args: Any, output: Any) -> None:
        if len(captured) < num_layers:
            captured.append(_first_tensor(output).detach().float().cpu())

    def keep_final(_module: nn.Module, _args: Any, output: Any) -> None:
        if not final:
            final.append(_first_tensor(output).detach().float().cpu())

    hooks = [layer.register_forward_hook(keep_layer)
             for layer in decoder_layers(model, num_layers)]
    hooks.append(model.register_forward_hook(keep_final))
    for module in carrying:
        module.carries_residual = False
    try:
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        engine.add_request("check-layers", None, params, prompt)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        for hook in hooks:
            hook.remove()
        for module in carrying:
            module.carries_residual = True
    return captured[:num_layers - 1] + final


@torch.inference_mode()
def hf_layer_states(model: nn.Module, prompt: list[int]) -> list[torch.Tensor]:
    """HF's ``hidden_states[1:]`` for ``prompt``: after each layer, the last one after the norm."""
    reset_dynamic_rope(model)
    device = next(model.parameters()).device
    out = model(torch.tensor([prompt], device=device), output_hidden_states=True)
    return [h[0].detach().float().cpu() for h in out.hidden_states[1:]]


def layer_differences(ours: list[torch.Tensor],
                      theirs: list[torch.Tensor]) -> list[tuple[float, float]]:
    """(max abs difference, max abs of HF's values) per layer."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} hidden states of ours against {len(theirs)} of HF")
    return [((a - b).abs().max().item(), b.abs().max().item()) for a, b in zip(ours, theirs)]


def first_divergent_layer(diffs: list[tuple[float, float]], tol: float) -> Optional[int]:
    """The first layer whose difference exceeds ``tol`` times max(1, the size of HF's values)."""
    for i, (diff, scale) in enumerate(diffs):
        if not diff <= tol * max(1.0, scale):  # NaN counts as divergent
            return i
    return None


def first_difference(a: list[int], b: list[int]) -> Optional[int]:
    """Index of the first differing token (or the shorter length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
