"""Helpers of the cacheflow-models tests: run our engine, run HF transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, cast

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from cacheflow_models import build_model_config, load_tokenizer
from cacheflow_runtime import (
    CacheConfig,
    LLMEngine,
    ParallelConfig,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
)
from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.layers.embedding import VocabParallelEmbedding
from cacheflow_runtime.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from cacheflow_runtime.model_loader import load_model
from cacheflow_runtime.registry import load_model_class
from cacheflow_runtime.weights import iterate_weights


def run_engine(path: Path, prompts: list[list[int]],
               params: SamplingParams | list[SamplingParams],
               dtype: str = "float32", device: str = "cpu", enforce_eager: bool = False,
               engine_out: list[LLMEngine] | None = None, tensor_parallel_size: int = 1,
               **cache: Any) -> list[RequestOutput]:
    """Runs all prompts as one batch through an engine (float32 on CPU by default).

    Outputs come back in prompt order. With ``tensor_parallel_size`` > 1 the ranks are worker
    processes (gloo on CPU), released before returning.
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


def load_tiny_model(path: Path) -> nn.Module:
    """The registered model for the checkpoint at ``path``, loaded on the CPU in float32 at the
    current tensor-parallel rank."""
    return load_model(build_model_config(path, "float32"), torch.device("cpu"))


def load_with_weights(path: Path, weights: list[tuple[str, torch.Tensor]]) -> nn.Module:
    """Builds the model of the checkpoint at ``path`` and loads ``weights`` into it instead of
    the checkpoint's own tensors (to test renamed, extra or missing tensors)."""
    config = build_model_config(path, "float32")
    model = load_model_class(config.architecture)(config.hf_config)
    model.load_weights(weights, "safetensors")
    return model


def checkpoint_tensors(path: Path) -> list[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the tiny checkpoint at ``path``, copied out of the file."""
    return [(name, tensor.clone()) for name, tensor in iterate_weights(path)]


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    """Both models hold exactly the same parameter values under the same names."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def _cat_parts(shards: list[torch.Tensor], sizes: list[int],
               owners: Optional[list[list[int]]] = None) -> list[torch.Tensor]:
    """Splits each rank's fused shard into parts of ``sizes`` rows and concatenates part i over
    the ranks in ``owners[i]`` (all ranks by default)."""
    split = [s.split(sizes, dim=0) for s in shards]
    ranks = owners or [list(range(len(shards)))] * len(sizes)
    return [torch.cat([split[r][i] for r in ranks[i]], dim=0) for i in range(len(sizes))]


def _reassemble(module: nn.Module, shard_modules: list[nn.Module], attr: str,
                full: torch.Tensor, shards: list[torch.Tensor]) -> None:
    """Asserts that the ranks' ``shards`` of parameter ``attr`` of ``module`` give ``full``."""
    world = len(shards)
    if isinstance(module, VocabParallelEmbedding):
        got = torch.cat(shards, dim=0)[:module.num_embeddings]
        assert torch.equal(got, full)
    elif isinstance(module, QKVParallelLinear):
        first = cast(QKVParallelLinear, shard_modules[0])
        sizes = [first.q_size, first.kv_size, first.kv_size]
        kv_owners = list(range(0, world, first.kv_replicas))
        for r in range(world):  # ranks that share a KV head hold the same copy of it
            kv = shards[r].split(sizes, dim=0)[1:]
            ref = shards[kv_owners[r // first.kv_replicas]].split(sizes, dim=0)[1:]
            assert all(torch.equal(x, y) for x, y in zip(kv, ref))
        parts = _cat_parts(shards, sizes, [list(range(world)), kv_owners, kv_owners])
        q_total = module.total_num_heads * module.head_size
        kv_total = module.total_num_kv_heads * module.head_size
        expected = full.split([q_total, kv_total, kv_total], dim=0)
        assert all(torch.equal(p, e) for p, e in zip(parts, expected))
    elif isinstance(module, MergedColumnParallelLinear):
        parts = _cat_parts(shards, [s // world for s in module.output_sizes])
        expected = full.split(module.output_sizes, dim=0)
        assert all(torch.equal(p, e) for p, e in zip(parts, expected))
    elif isinstance(module, ColumnParallelLinear):
        assert torch.equal(torch.cat(shards, dim=0), full)
    elif isinstance(module, RowParallelLinear) and attr == "weight":
        assert torch.equal(torch.cat(shards, dim=1), full)
    else:  # replicated: row-parallel biases, LayerNorms, ReplicatedLinear
        assert all(torch.equal(s, full) for s in shards)


def assert_tp_shards_roundtrip(path: Path, world_size: int) -> int:
    """Loads the checkpoint at ``path`` whole and as each rank of ``world_size``, and asserts that
    every parallel parameter's shards, concatenated along its split dimension (per part for fused
    projections), give back the whole tensor, and that replicated ones are equal on every rank.

    Returns how many parameters were checked (every parameter of the model).
    """
    full = load_tiny_model(path)
    ranks: list[nn.Module] = []
    for rank in range(world_size):
        with ps.tensor_parallel_shard(world_size, rank):
            ranks.append(load_tiny_model(path))
    rank_modules = [dict(m.named_modules()) for m in ranks]
    checked = 0
    for mod_name, module in full.named_modules():
        shard_modules = [mods[mod_name] for mods in rank_modules]
        for attr, param in module.named_parameters(recurse=False):
            shards = [getattr(m, attr).data for m in shard_modules]
            try:
                _reassemble(module, shard_modules, attr, param.data, shards)
            except AssertionError as exc:
                raise AssertionError(f"{mod_name}.{attr} ({type(module).__name__}) at world size "
                                     f"{world_size}") from exc
            checked += 1
    assert checked == len(list(full.named_parameters(remove_duplicate=False)))
    return checked


def check_greedy_fidelity(path: Path, prompts: list[list[int]], new_tokens: int) -> None:
    """Greedy token ids identical to HF ``generate`` and chosen-token logprobs within 1e-4, with
    all ``prompts`` run together as one batch."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    outputs = run_engine(path, prompts, params)
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy(path, prompt, new_tokens)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        assert completion.finish_reason == "length"
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-4
