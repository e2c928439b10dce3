"""The decode path's ops launched with programmatic dependent launch (PDL) on a CUDA device.

Each op may be scheduled while the previous kernel on the stream is still finishing and waits
for it inside (csrc/pdl.cuh). A layer-shaped chain (matmul -> RMSNorm -> matmul -> rotary ->
cache write -> decode attention -> SiLU-and-mul), where every op reads what the one before it
wrote, is captured in a CUDA graph and replayed with fresh inputs; its results must equal, bit
for bit, the same chain launched without PDL (CACHEFLOW_PDL=0) and run eagerly. A missing wait
would let an op read its input before the producer finished and show up as a difference.
"""

from __future__ import annotations

from typing import Any

import pytest

import cacheflow_kernels

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

HEADS, HEAD_SIZE, BLOCK, HIDDEN = 8, 128, 16, 8 * 128


def _setup(seed: int, batch: int, context: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.float16

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=g, device=dev, dtype=dt) * 0.5

    blocks_per_seq = (context + BLOCK - 1) // BLOCK
    num_blocks = batch * blocks_per_seq + 1
    perm = torch.randperm(num_blocks - 1, generator=g, device=dev).to(torch.int32) + 1
    tables = perm.view(batch, blocks_per_seq)
    slots = tables[:, (context - 1) // BLOCK].long() * BLOCK + (context - 1) % BLOCK
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_SIZE, 2, device=dev).float() / HEAD_SIZE))
    freqs = torch.outer(torch.arange(4096, device=dev).float(), inv)
    return {
        "x": rand(batch, HIDDEN), "w_in": rand(HIDDEN, HIDDEN) * 0.05,
        "w_qkv": rand(3 * HIDDEN, HIDDEN) * 0.05, "norm_w": rand(HIDDEN) + 1.0,
        "key_cache": rand(num_blocks, BLOCK, HEADS, HEAD_SIZE),
        "value_cache": rand(num_blocks, BLOCK, HEADS, HEAD_SIZE),
        "tables": tables, "context_lens": torch.full((batch,), context, dtype=torch.int32,
                                                     device=dev),
        "slots": slots, "positions": torch.full((batch,), context - 1, device=dev),
        "max_context": context,  # a host int: nothing in the chain may synchronize
        "cos_sin": torch.cat([freqs.cos(), freqs.sin()], dim=-1),
    }


def _chain(s: dict[str, Any]) -> Any:
    h = s["x"] @ s["w_in"].t()
    normed = torch.empty_like(h)
    cacheflow_kernels.rms_norm(normed, h, s["norm_w"], 1e-6)
    qkv = normed @ s["w_qkv"].t()
    q2, k2, v2 = qkv.split(HIDDEN, dim=1)
    cacheflow_kernels.rotary_embedding(s["positions"], q2, k2, s["cos_sin"], HEAD_SIZE, True)
    q, k, v = (t.view(-1, HEADS, HEAD_SIZE) for t in (q2, k2, v2))
    cacheflow_kernels.reshape_and_cache(k, v, s["key_cache"], s["value_cache"], s["slots"])
    attn = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cacheflow_kernels.paged_attention(attn, q, s["key_cache"], s["value_cache"], s["tables"],
                                      s["context_lens"], HEAD_SIZE ** -0.5,
                                      max_context_len=s["max_context"])
    out = torch.empty(attn.shape[0], HIDDEN // 2, dtype=attn.dtype, device=attn.device)
    cacheflow_kernels.silu_and_mul(out, attn.view(attn.shape[0], HIDDEN))
    return out


def _fresh_copy(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}


@pytest.mark.parametrize("release", ["early", "exit"])
@pytest.mark.parametrize(("batch", "context"), [(1, 200), (64, 1000), (2, 9000)])
def test_chain_in_a_graph_matches_plain_launches(monkeypatch: Any, batch: int, context: int,
                                                 release: str) -> None:
    """The decode kernel issues its first K/V copies before its PDL wait (all but the position
    the cache write before it stores); (2, 9000) takes the split-K path and its merge kernel.
    "early" (the default): a split launch's main kernel releases the merge kernel before it
    finishes; "exit": as its CTAs exit."""
    if release == "exit":
        monkeypatch.setenv("CACHEFLOW_PA_MAIN_RELEASE", "0")
    base = _setup(3, batch, context)
    monkeypatch.setenv("CACHEFLOW_PDL", "0")
    plain = _fresh_copy(base)
    expected = _chain(plain)
    torch.cuda.synchronize()
    monkeypatch.delenv("CACHEFLOW_PDL")

    eager = _fresh_copy(base)
    assert torch.equal(_chain(eager), expected)
    assert torch.equal(eager["key_cache"], plain["key_cache"])

    graphed = _fresh_copy(base)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _chain(_fresh_copy(base))  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = _chain(graphed)
    for seed in (11, 12, 13):
        fresh = _setup(seed, batch, context)
        for name, value in fresh.items():
            if isinstance(value, torch.Tensor):
                graphed[name].copy_(value)
        graph.replay()
        monkeypatch.setenv("CACHEFLOW_PDL", "0")
        reference = _fresh_copy(fresh)
        want = _chain(reference)
        monkeypatch.delenv("CACHEFLOW_PDL")
        torch.cuda.synchronize()
        assert torch.equal(result, want), f"replay with inputs of seed {seed}"
        assert torch.equal(graphed["key_cache"], reference["key_cache"])
