"""LLaMA blocks on the residual stream (``CACHEFLOW_SKINNY_FUSE=1``): for one-row steps the norms
run inside the qkv / gate_up projections and the residual adds inside the o / down projections.

On CPU the kernel is replaced by a torch reference of its contract (rms_norm of x with the norm's
weight, SiLU-gated x, residual added in place, the product rounded before the add), and the
routing check by one that takes every one-row call. The engine's greedy tokens and logprobs must
then be exactly those of the plain path: the stream path only moves where each norm and add
happens. The GPU tests of the kernel itself are in cacheflow-kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import cacheflow_kernels
from cacheflow_models.testing import run_engine, save_tiny_checkpoint, tiny_llama_config
from cacheflow_runtime import SamplingParams
from cacheflow_runtime.layers import linear as linear_layers
from cacheflow_runtime.layers.activation import SiluAndMul
from cacheflow_runtime.layers.layernorm import RMSNorm

NEW_TOKENS = 12


class FakeSkinny:
    """skinny_gemm's contract in torch, recording which options each call used."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool, bool]] = []  # (norm, silu, residual in place)

    def __call__(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 bias: Any = None, activation: Any = None, norm_weight: Any = None,
                 eps: float = 1e-6, residual: Any = None) -> None:
        self.calls.append((norm_weight is not None, activation == "silu",
                           residual is not None and residual is out))
        if norm_weight is not None:
            norm = RMSNorm(x.shape[1], eps)
            norm.weight.data = norm_weight
            x = norm(x)
        if activation == "silu":
            x = SiluAndMul()(x)
        y = F.linear(x, weight, bias)
        out.copy_(y if residual is None else residual + y)


def one_row(x: torch.Tensor, weight: torch.Tensor, silu_gated: bool = False) -> bool:
    return (x.dim() == 2 and x.shape[0] == 1
            and x.shape[1] == weight.shape[1] * (2 if silu_gated else 1))


def generate(path: Path, prompts: list[list[int]]) -> list[Any]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    return run_engine(path, prompts, params)


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 1},
                                       {"tie_word_embeddings": True}])
def test_stream_blocks_give_the_plain_blocks_results(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path,
                                                     overrides: dict[str, Any]) -> None:
    path = save_tiny_checkpoint(tmp_path / "llama", tiny_llama_config(**overrides))
    prompts = [[5, 9, 2, 7, 7, 1, 30]]  # one sequence: its decode steps are one row
    monkeypatch.setenv("CACHEFLOW_SKINNY_FUSE", "0")
    plain = generate(path, prompts)

    fake = FakeSkinny()
    monkeypatch.setattr(cacheflow_kernels, "skinny_gemm", fake)
    monkeypatch.setattr(linear_layers, "skinny_gemm_applies", one_row)
    monkeypatch.delenv("CACHEFLOW_SKINNY_FUSE", raising=False)  # on by default
    fused = generate(path, prompts)

    for a, b in zip(plain, fused):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    layers = tiny_llama_config(**overrides).num_hidden_layers
    decode_steps = NEW_TOKENS - 1
    # Per decode step and layer: qkv and gate_up with the norm, o with the add, down gated with
    # the add, all in place on the stream.
    assert fake.calls.count((True, False, False)) == 2 * layers * decode_steps
    assert fake.calls.count((False, False, True)) == layers * decode_steps
    assert fake.calls.count((False, True, True)) == layers * decode_steps


def test_off_with_the_switch_at_zero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With CACHEFLOW_SKINNY_FUSE=0 one-row steps keep the norm and add kernels: no call
    carries a norm weight or a residual."""
    path = save_tiny_checkpoint(tmp_path / "llama", tiny_llama_config())
    fake = FakeSkinny()
    monkeypatch.setattr(cacheflow_kernels, "skinny_gemm", fake)
    monkeypatch.setattr(linear_layers, "skinny_gemm_applies", one_row)
    monkeypatch.setenv("CACHEFLOW_SKINNY_FUSE", "0")
    generate(path, [[3, 4, 5]])
    assert fake.calls and not any(norm or add for norm, _, add in fake.calls)
