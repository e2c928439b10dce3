"""Dynamic NTK rotary scaling per sequence, sliding-window attention in the reference backend,
and the small loading helpers models use (which file a tensor came from, per-rank building,
model classes named by import path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.attention.reference import paged_attention, reshape_and_cache
from cacheflow_runtime.layers.linear import ColumnParallelLinear
from cacheflow_runtime.layers.rotary_embedding import (
    RotaryEmbedding,
    length_dependent_rope,
    prompt_rotation_key,
    rope_inv_freq,
    rope_max_positions,
)
from cacheflow_runtime.registry import load_model_class
from cacheflow_runtime.weights import iterate_weights

HEAD, DIM, ORIG, FACTOR, BASE = 16, 16, 24, 4.0, 10000.0


def _rope(scaling: dict | None) -> RotaryEmbedding:
    return RotaryEmbedding(HEAD, DIM, ORIG, BASE, True, scaling)


def test_max_positions_by_scaling_type() -> None:
    assert rope_max_positions(24, None) == 24
    assert rope_max_positions(24, {"rope_type": "linear", "factor": 2.0}) == 48
    assert rope_max_positions(24, {"type": "dynamic", "factor": 4.0}) == 96
    assert rope_max_positions(24, {"rope_type": "llama3", "factor": 8.0}) == 24
    with pytest.raises(ValueError, match="past the rotary table"):
        _rope(None)(torch.tensor([24]), torch.zeros(1, HEAD), torch.zeros(1, HEAD))


def _expected_dynamic(positions: torch.Tensor, q: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Neox rotary in float64 with the dynamic NTK base for a sequence of ``seq_len``."""
    length = max(seq_len, ORIG)
    base = BASE * (FACTOR * length / ORIG - (FACTOR - 1)) ** (DIM / (DIM - 2))
    inv = 1.0 / base ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)
    ang = positions.double()[:, None] * inv[None, :]
    x1, x2 = q.double()[:, :DIM // 2], q.double()[:, DIM // 2:]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def test_dynamic_ntk_rotates_each_sequence_with_its_own_length() -> None:
    dynamic = _rope({"rope_type": "dynamic", "factor": FACTOR})
    gen = torch.Generator().manual_seed(0)
    # Sequences: a 40-token prefill (past ORIG), a decode at position 60, a short prefill, and
    # a decode at position 10 (still within ORIG).
    parts = [(torch.arange(40), 40), (torch.tensor([60]), 61), (torch.arange(7), 7),
             (torch.tensor([10]), 11)]
    positions = torch.cat([p for p, _ in parts])
    q = torch.randn(len(positions), HEAD, generator=gen)
    out, _ = dynamic(positions, q, q.clone(), [len(p) for p, _ in parts], [c for _, c in parts])
    plain = _rope(None)
    start = 0
    for pos, ctx in parts:
        got = out[start:start + len(pos)]
        torch.testing.assert_close(got.double(), _expected_dynamic(pos, q[start:start + len(pos)],
                                                                   ctx), atol=1e-5, rtol=1e-5)
        alone, _ = dynamic(pos, q[start:start + len(pos)], q[start:start + len(pos)],
                           [len(pos)], [ctx])
        assert torch.equal(got, alone)  # independent of the rest of the batch
        if ctx <= ORIG:  # unscaled within the trained length
            short, _ = plain(pos, q[start:start + len(pos)], q[start:start + len(pos)])
            assert torch.equal(got, short)
        start += len(pos)
    # Without sequence lengths the batch counts as one sequence of max(positions) + 1.
    whole, _ = dynamic(torch.arange(30), q[:30], q[:30])
    torch.testing.assert_close(whole.double(), _expected_dynamic(torch.arange(30), q[:30], 30),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not describe"):
        dynamic(positions, q, q, [1], [1])


LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": ORIG,
            "short_factor": [1.0 + 0.25 * i for i in range(DIM // 2)],
            "long_factor": [3.0 + 0.5 * i for i in range(DIM // 2)]}


@pytest.mark.parametrize("scaling", [{"rope_type": "dynamic", "factor": FACTOR}, LONGROPE],
                         ids=["dynamic", "longrope"])
def test_length_scaled_rope_rotates_a_prompt_alike_in_any_chunks(scaling: dict) -> None:
    """A 40-token prompt (past ORIG) cut into chunked-prefill steps of 16, 16 and 8 tokens, each
    beside another sequence, is rotated exactly as in one step (HF rotates every prompt token
    for the prompt's length), and its first chunk differs from a 16-token prompt's rotation."""
    rope = RotaryEmbedding(HEAD, DIM, 96, BASE, True, scaling) if scaling is LONGROPE \
        else _rope(scaling)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(40, HEAD, generator=gen)
    whole, _ = rope(torch.arange(40), q.clone(), q.clone(), [40], [40], [40])
    other = torch.randn(1, HEAD, generator=gen)
    for lo, hi in ((0, 16), (16, 32), (32, 40)):
        # a decode at position 50 first (prompt length 0: past its prompt), then the chunk
        positions = torch.cat((torch.tensor([50]), torch.arange(lo, hi)))
        x = torch.cat((other, q[lo:hi]))
        out, _ = rope(positions, x.clone(), x.clone(), [1, hi - lo], [51, hi], [0, 40])
        assert torch.equal(out[1:], whole[lo:hi])
        decode, _ = rope(torch.tensor([50]), other.clone(), other.clone(), [1], [51])
        assert torch.equal(out[:1], decode)
    short, _ = rope(torch.arange(16), q[:16].clone(), q[:16].clone(), [16], [16], [16])
    assert not torch.allclose(short, whole[:16])
    # Without prompt lengths a chunk counts as a prompt ending at its context: the old rule.
    chunk, _ = rope(torch.arange(16), q[:16].clone(), q[:16].clone(), [16], [16])
    assert torch.equal(chunk, short)


def test_length_scaled_rope_after_the_prompt_goes_by_position() -> None:
    """Recomputing a preempted sequence (a 20-token prompt and 10 generated tokens in one
    step) rotates each generated token at p for the length p + 1, as when it was decoded."""
    dynamic = _rope({"rope_type": "dynamic", "factor": FACTOR})
    q = torch.randn(30, HEAD, generator=torch.Generator().manual_seed(2))
    out, _ = dynamic(torch.arange(30), q.clone(), q.clone(), [30], [30], [20])
    prompt, _ = dynamic(torch.arange(20), q[:20].clone(), q[:20].clone(), [20], [20], [20])
    assert torch.equal(out[:20], prompt)
    for p in range(20, 30):
        torch.testing.assert_close(out[p:p + 1].double(),
                                   _expected_dynamic(torch.tensor([p]), q[p:p + 1], p + 1),
                                   atol=1e-5, rtol=1e-5)


def test_prompt_rotation_key_separates_differently_rotated_prompts() -> None:
    dynamic = length_dependent_rope(24, {"rope_type": "dynamic", "factor": 4.0})
    longrope = length_dependent_rope(96, LONGROPE)
    assert dynamic == ("dynamic", 24) and longrope == ("longrope", ORIG)
    assert length_dependent_rope(24, {"rope_type": "linear", "factor": 2.0}) is None
    assert length_dependent_rope(24, None) is None
    assert [prompt_rotation_key(dynamic, n) for n in (10, 24, 25, 40)] == [
        "", "", "rope:dynamic:25", "rope:dynamic:40"]
    assert [prompt_rotation_key(longrope, n) for n in (24, 25, 90)] == [
        "", "rope:long", "rope:long"]
    assert prompt_rotation_key(None, 10_000) == ""


def test_reference_attention_sliding_window() -> None:
    gen = torch.Generator().manual_seed(1)
    block, heads, kv_heads, d, window = 8, 4, 2, 16, 5
    shapes = [(0, 13), (20, 1), (9, 4)]  # (cached tokens, new tokens) per sequence
    key_cache = torch.full((30, block, kv_heads, d), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    free = list(range(30))
    tables, slots, qs, ks, vs = [], [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block))]
        k, v = torch.randn(2, total, kv_heads, d, generator=gen)
        all_slots = torch.tensor([table[p // block] * block + p % block for p in range(total)])
        reshape_and_cache(k, v, key_cache, value_cache, all_slots)
        tables.append(table)
        slots.append(all_slots[cached:])
        qs.append(torch.randn(new, heads, d, generator=gen))
        ks.append(k)
        vs.append(v)
    width = max(len(t) for t in tables)
    q_lens = [n for _, n in shapes]
    meta = InputMetadata(
        query_lens=q_lens, context_lens_host=[c + n for c, n in shapes],
        query_start_loc=torch.tensor([0, 13, 14, 18], dtype=torch.int32),
        context_lens=torch.tensor([c + n for c, n in shapes], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32),
        slot_mapping=torch.cat(slots), logit_indices=torch.tensor([12, 13, 17]), is_prompt=True)
    out = paged_attention(torch.cat(qs), key_cache, value_cache, meta, d ** -0.5,
                          sliding_window=window)
    start = 0
    for (cached, new), q, k, v in zip(shapes, qs, ks, vs):
        q_pos = torch.arange(new)[:, None] + cached
        k_pos = torch.arange(cached + new)[None, :]
        visible = (k_pos <= q_pos) & (k_pos > q_pos - window)
        kk = k.double().repeat_interleave(heads // kv_heads, dim=1)
        vv = v.double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * d ** -0.5
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        ref = torch.einsum("hqk,khd->qhd", probs, vv)
        torch.testing.assert_close(out[start:start + new].double(), ref, atol=1e-5, rtol=1e-5)
        start += new


def test_weight_iterator_tells_the_file(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1), "b": torch.ones(1)}, tmp_path / "model-1.safetensors")
    save_file({"c": torch.zeros(2)}, tmp_path / "model-2.safetensors")
    weights = iterate_weights(tmp_path)
    assert weights.path == tmp_path and weights.current_file is None
    seen = {name: weights.current_file for name, _ in weights}
    assert seen == {"a": tmp_path / "model-1.safetensors", "b": tmp_path / "model-1.safetensors",
                    "c": tmp_path / "model-2.safetensors"}


def test_tensor_parallel_shard_builds_one_rank() -> None:
    with ps.tensor_parallel_shard(4, 3):
        assert (ps.get_tensor_parallel_world_size(), ps.get_tensor_parallel_rank()) == (4, 3)
        layer = ColumnParallelLinear(8, 16)
        full = torch.arange(16 * 8, dtype=torch.float32).view(16, 8)
        layer.weight.weight_loader(layer.weight, full)
    assert (ps.get_tensor_parallel_world_size(), ps.get_tensor_parallel_rank()) == (1, 0)
    assert torch.equal(layer.weight, full[12:16])


def test_model_class_by_import_path() -> None:
    assert load_model_class("torch.nn:Linear") is torch.nn.Linear
    with pytest.raises(ValueError, match="cannot import model class 'torch.nn:Nope'"):
        load_model_class("torch.nn:Nope")


def test_rotary_module_moves_like_any_module() -> None:
    """``.to()`` walks every submodule's ``_apply``: the rotary layer must not shadow it, and
    its cos/sin table moves with it (one buffer, cos | sin, as the CUDA kernel reads it)."""
    rope = RotaryEmbedding(64, 32, 128, 10000.0, True)
    model = torch.nn.Sequential(rope).to("cpu")
    assert model[0] is rope
    assert rope.cos_sin_cache.shape == (128, 32) and rope.cos_sin_cache.dtype == torch.float32
    assert torch.equal(rope.cos_cache, rope.cos_sin_cache[:, :16])
    assert torch.equal(rope.sin_cache[5], torch.sin(5 * rope_inv_freq(32, 10000.0)))
