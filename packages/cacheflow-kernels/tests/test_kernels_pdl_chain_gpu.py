"""Kernels that release their successor early (programmatic dependent launch), chained as in a
decode step at batch 1 and captured in a CUDA graph: every kernel reads what the one before it
wrote while that one may release it before finishing. Replays with new inputs must give the bits
of the same kernels run one after the other with the early releases switched off.

Chains: decode attention (an unsplit grid of 32 CTAs, released right after its wait) -> the out
projection's skinny_gemm; skinny_gemm gate_up -> skinny_gemm down (SiLU-gated) -> rms_norm ->
skinny_gemm; at several ring depths of skinny_gemm; a layer with the norms and residual adds
inside skinny_gemm; and rms_norm -> qkv -> rotary + cache write -> attention -> out projection
with new positions and slots between replays (reads before the PDL wait). Needs compute
capability 9.0+.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from skinny_testutil import check

import cacheflow_kernels as ck

from paged_attention_testutil import ARG_ORDER, make_case

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available()
                            and torch.cuda.get_device_capability() >= (9, 0)),
                       reason="PDL and skinny_gemm need compute capability 9.0+"),
]

RELEASE_KNOBS = ("CACHEFLOW_PA_EARLY_RELEASE", "CACHEFLOW_SKINNY_EARLY_RELEASE")


def _capture(step: Callable[[], None]) -> Any:
    """A CUDA graph of `step` on a side stream (after one eager warm-up call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def _eager_without_early_release(monkeypatch: pytest.MonkeyPatch,
                                 step: Callable[[], None]) -> None:
    """Runs `step` eagerly with every early release switched off, synchronizing after it."""
    with monkeypatch.context() as m:
        for knob in RELEASE_KNOBS:
            m.setenv(knob, "0")
        step()
        torch.cuda.synchronize()


@pytest.mark.parametrize("ctx", [1, 37, 300])
def test_decode_attention_then_out_projection(monkeypatch: pytest.MonkeyPatch, ctx: int) -> None:
    """LLaMA-7B's attention at batch 1 (32 heads of 128, one sequence: 32 CTAs, released right
    after their wait) followed by the out projection, which starts reading its weights while the
    attention runs and must still read the attention's new output."""
    for knob in RELEASE_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    shape = dict(num_heads=32, num_kv_heads=32, head_size=128, block_size=16, device="cuda",
                 num_blocks=40, max_blocks_per_seq=32, dtype=torch.float16)
    case = make_case([ctx], seed=0, **shape)
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(4096, 4096, generator=gen) / 64).half().cuda()
    proj = torch.empty(1, 4096, dtype=torch.float16, device="cuda")

    def step() -> None:
        ck.paged_attention(*(case[n] for n in ARG_ORDER), case["scale"], None,
                           max_context_len=512)
        ck.skinny_gemm(proj, case["out"].view(1, 4096), w)

    graph = _capture(step)
    for seed in (1, 2, 3):
        fresh = make_case([ctx], seed=seed, **shape)
        for name in ("query", "key_cache", "value_cache", "block_tables", "context_lens"):
            case[name].copy_(fresh[name])
        case["out"].fill_(float("nan"))
        proj.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got_attn, got_proj = case["out"].clone(), proj.clone()
        _eager_without_early_release(monkeypatch, step)
        assert torch.equal(got_attn, case["out"]), f"replay {seed}: attention"
        assert torch.equal(got_proj, proj), f"replay {seed}: out projection"
        check(got_proj, got_attn.view(1, 4096), w, None)


@pytest.mark.parametrize("max_stages", ["2", "3", "", "8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mlp_then_norm_then_projection(monkeypatch: pytest.MonkeyPatch, max_stages: str,
                                       dtype: Any) -> None:
    """gate_up -> down (SiLU-gated) -> rms_norm -> qkv, as between two layers at batch 1, each
    skinny_gemm releasing its successor right after its wait, rings of 2, 3, 4 (the default) and
    the deepest that fits (6 and 5 stages here); replays with a new input equal the kernels run
    without early releases."""
    for knob in RELEASE_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("CACHEFLOW_SKINNY_STAGES", max_stages)
    gen = torch.Generator().manual_seed(11)
    x = torch.empty(1, 4096, dtype=dtype, device="cuda")
    w_gate_up = (torch.randn(22016, 4096, generator=gen) / 64).to(dtype).cuda()
    w_down = (torch.randn(4096, 11008, generator=gen) / 105).to(dtype).cuda()
    w_qkv = (torch.randn(12288, 4096, generator=gen) / 64).to(dtype).cuda()
    norm_w = (1 + torch.randn(4096, generator=gen) / 10).to(dtype).cuda()
    gate_up = torch.empty(1, 22016, dtype=dtype, device="cuda")
    down = torch.empty(1, 4096, dtype=dtype, device="cuda")
    normed = torch.empty_like(down)
    qkv = torch.empty(1, 12288, dtype=dtype, device="cuda")

    def step() -> None:
        ck.skinny_gemm(gate_up, x, w_gate_up)
        ck.skinny_gemm(down, gate_up, w_down, activation="silu")
        ck.rms_norm(normed, down, norm_w, 1e-5)
        ck.skinny_gemm(qkv, normed, w_qkv)

    x.copy_(torch.randn(1, 4096, generator=gen).to(dtype))
    graph = _capture(step)
    outputs = (gate_up, down, normed, qkv)
    for seed in (1, 2):
        x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).to(dtype))
        for t in outputs:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in outputs]
        _eager_without_early_release(monkeypatch, step)
        for name, g, want in zip(("gate_up", "down", "normed", "qkv"), got, outputs):
            assert torch.equal(g, want), f"replay {seed}: {name}"
        check(got[0], x, w_gate_up, None)
        check(got[3], got[2], w_qkv, None)


def test_layer_with_norms_and_residual_adds_in_the_gemms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two batch-1 layers whose norms run in the qkv / gate_up GEMMs' prologue and whose residual
    adds run in the o / down GEMMs' epilogue, in place on the residual stream: six kernels a
    layer, each reading what the one before wrote. Replays with a new stream equal the same
    kernels run eagerly without early releases."""
    for knob in RELEASE_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    dtype = torch.float16
    gen = torch.Generator().manual_seed(21)

    def weight(n: int, k: int) -> Any:
        return (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).cuda()

    layers = [{"qkv": weight(12288, 4096), "o": weight(4096, 4096),
               "gate_up": weight(22016, 4096), "down": weight(4096, 11008),
               "ln1": (1 + torch.randn(4096, generator=gen) / 10).to(dtype).cuda(),
               "ln2": (1 + torch.randn(4096, generator=gen) / 10).to(dtype).cuda()}
              for _ in range(2)]
    stream = torch.empty(1, 4096, dtype=dtype, device="cuda")
    qkv = torch.empty(1, 12288, dtype=dtype, device="cuda")
    gate_up = torch.empty(1, 22016, dtype=dtype, device="cuda")

    def step() -> None:
        for w in layers:
            ck.skinny_gemm(qkv, stream, w["qkv"], norm_weight=w["ln1"], eps=1e-5)
            ck.skinny_gemm(stream, qkv[:, :4096], w["o"], residual=stream)
            ck.skinny_gemm(gate_up, stream, w["gate_up"], norm_weight=w["ln2"], eps=1e-5)
            ck.skinny_gemm(stream, gate_up, w["down"], activation="silu", residual=stream)

    start = torch.randn(1, 4096, generator=gen).to(dtype).cuda()
    stream.copy_(start)
    graph = _capture(step)
    for seed in (1, 2):
        start = torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).to(dtype)
        stream.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        got = stream.clone()
        stream.copy_(start)
        _eager_without_early_release(monkeypatch, step)
        assert torch.equal(got, stream), f"replay {seed}"
        assert torch.isfinite(got).all() and not torch.equal(got, start.cuda())


@pytest.mark.parametrize("cache_dtype", ["auto", "fp8"])
def test_attention_half_layer_with_new_positions(monkeypatch: pytest.MonkeyPatch,
                                                 cache_dtype: str) -> None:
    """rms_norm -> qkv -> rotary + cache write -> decode attention -> out projection at batch 1,
    with a new position, slot, context and block table before every replay (uploaded before the
    graph, as the engine does). rms_norm fetches its weight and the rotary kernel reads the
    position and slot and stages its cos/sin row before their PDL wait, while the kernel before
    them may still run; replays must equal the kernels run eagerly without early releases."""
    for knob in RELEASE_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    dtype, heads, d, bs = torch.float16, 32, 128, 16
    hidden = heads * d
    shape = dict(num_heads=heads, num_kv_heads=heads, head_size=d, block_size=bs, device="cuda",
                 num_blocks=40, max_blocks_per_seq=32, dtype=dtype)
    fp8 = cache_dtype == "fp8"

    def new_case(ctx: int, seed: int) -> dict[str, Any]:
        made = make_case([ctx], seed=seed, **shape)
        if fp8:  # unowned slots: 0 instead of NaN (E4M3 has no infinity to saturate to)
            for name in ("key_cache", "value_cache"):
                made[name] = made[name].nan_to_num(0.0).clamp(-448, 448).to(
                    torch.float8_e4m3fn)
        return made

    case = new_case(300, 0)
    gen = torch.Generator().manual_seed(31)
    w_qkv = (torch.randn(3 * hidden, hidden, generator=gen) / 64).to(dtype).cuda()
    w_o = (torch.randn(hidden, hidden, generator=gen) / 64).to(dtype).cuda()
    ln = (1 + torch.randn(hidden, generator=gen) / 10).to(dtype).cuda()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(1024, dtype=torch.float64), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=1).float().cuda()
    x = torch.empty(1, hidden, dtype=dtype, device="cuda")
    normed = torch.empty_like(x)
    qkv = torch.empty(1, 3 * hidden, dtype=dtype, device="cuda")
    proj = torch.empty_like(x)
    positions = torch.zeros(1, dtype=torch.int64, device="cuda")
    slots = torch.zeros(1, dtype=torch.int64, device="cuda")
    q, k, v = qkv[:, :hidden], qkv[:, hidden:2 * hidden], qkv[:, 2 * hidden:]

    def step() -> None:
        ck.rms_norm(normed, x, ln, 1e-5)
        ck.skinny_gemm(qkv, normed, w_qkv)
        ck.rotary_embedding_with_cache(positions, q, k, v, cos_sin, d, True, case["key_cache"],
                                       case["value_cache"], slots)
        ck.paged_attention(case["out"], q.view(1, heads, d), case["key_cache"],
                           case["value_cache"], case["block_tables"], case["context_lens"],
                           case["scale"], None, max_context_len=512)
        ck.skinny_gemm(proj, case["out"].view(1, hidden), w_o)

    x.copy_(torch.randn(1, hidden, generator=gen).to(dtype))
    graph = _capture(step)
    for seed, ctx in ((1, 1), (2, 37), (3, 300), (4, 512)):
        fresh = new_case(ctx, seed)
        for name in ("key_cache", "value_cache", "block_tables", "context_lens"):
            case[name].copy_(fresh[name])
        pos = ctx - 1
        positions.fill_(pos)
        slots.fill_(int(fresh["block_tables"][0, pos // bs]) * bs + pos % bs)
        x.copy_(torch.randn(1, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype))
        start = {n: case[n].clone() for n in ("key_cache", "value_cache")}
        graph.replay()
        torch.cuda.synchronize()
        got = {"normed": normed.clone(), "qkv": qkv.clone(), "attention": case["out"].clone(),
               "proj": proj.clone(), "key_cache": case["key_cache"].clone(),
               "value_cache": case["value_cache"].clone()}
        for n, t in start.items():
            case[n].copy_(t)
        _eager_without_early_release(monkeypatch, step)
        want = {"normed": normed, "qkv": qkv, "attention": case["out"], "proj": proj,
                "key_cache": case["key_cache"], "value_cache": case["value_cache"]}
        for name, g in got.items():  # bit for bit (the caches' unowned slots hold NaN)
            assert torch.equal(g.view(torch.uint8), want[name].view(torch.uint8)), \
                f"replay {seed} (context {ctx}): {name}"
        assert torch.isfinite(got["proj"]).all(), f"replay {seed}: NaN in the projection"
        # The replay wrote this step's key where the slot says, rotated at the position.
        row = got["key_cache"].view(-1, heads, d)[int(slots)]
        if not fp8:
            assert torch.equal(row.view(1, hidden), got["qkv"][:, hidden:2 * hidden])
