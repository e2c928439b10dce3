"""Cascade attention on a CUDA device (run with ``pytest -m gpu``): the shared prefix through
torch's FlashAttention and the suffix through the decode kernel's ``lse`` output, merged, against
the plain decode kernel on the same cache; and the time of both at a batch that shares a long
prompt (printed, not asserted)."""

from __future__ import annotations

import pytest
import torch

from cacheflow_runtime.attention import build_input_metadata, cascade, cuda
from cacheflow_runtime.attention.reference import quantize_fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and cuda.available()),
                       reason="needs a CUDA device and the kernel library"),
]


def _batch(num_seqs: int, shared_blocks: int, num_heads: int, num_kv_heads: int,
           head_size: int, dtype: torch.dtype, fp8: bool, block_size: int = 16,
           seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    own = [1 + (97 * s) % 200 for s in range(num_seqs)]
    own_blocks = [-(-n // block_size) for n in own]
    num_blocks = shared_blocks + sum(own_blocks) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32)
    v = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32)
    if fp8:
        k, v = quantize_fp8(k, 0.5), quantize_fp8(v, 0.25)
    else:
        k, v = k.to(dtype), v.to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda").tolist()
    shared, rest = perm[:shared_blocks], perm[shared_blocks:]
    tables, ctx = [], []
    for n, b in zip(own, own_blocks):
        tables.append(shared + rest[:b])
        rest = rest[b:]
        ctx.append(shared_blocks * block_size + n)
    q = torch.randn(num_seqs, num_heads, head_size, generator=gen, device="cuda").to(dtype)
    return q, k, v, tables, ctx


@pytest.mark.parametrize(("dtype", "head_size", "heads", "fp8"), [
    (torch.float16, 128, (32, 32), False), (torch.bfloat16, 128, (32, 8), False),
    (torch.bfloat16, 64, (16, 2), True), (torch.float16, 256, (8, 1), False),
    (torch.float32, 128, (8, 8), False),
])
def test_cascade_matches_plain_decode(dtype: torch.dtype, head_size: int,
                                      heads: tuple[int, int], fp8: bool) -> None:
    q, k, v, tables, ctx = _batch(64, 40, *heads, head_size, dtype, fp8)
    scales = (0.5, 0.25) if fp8 else (1.0, 1.0)
    n = len(ctx)
    meta = build_input_metadata([1] * n, ctx, tables, [-1] * n, list(range(n)),
                                torch.device("cuda"), cascade_block_size=16)
    assert meta.cascade is not None and meta.cascade.num_tokens == 640
    scale = head_size ** -0.5
    plain = cuda.decode(q, k, v, meta, scale, k_scale=scales[0], v_scale=scales[1])
    out = cascade.cascade_decode(cuda, q, k, v, meta.cascade, scale, *scales)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.float(), plain.float(), rtol=tol, atol=tol)


def test_cascade_time_at_a_shared_prompt() -> None:
    """256 sequences sharing 2,048 tokens (LLaMA-7B attention shape, one layer): prints both
    times; the figure that matters is the engine benchmark's."""
    q, k, v, tables, ctx = _batch(256, 128, 32, 32, 128, torch.float16, False)
    n = len(ctx)
    meta = build_input_metadata([1] * n, ctx, tables, [-1] * n, list(range(n)),
                                torch.device("cuda"), cascade_block_size=16)
    assert meta.cascade is not None
    scale = 128 ** -0.5

    def timed(fn: object) -> float:
        for _ in range(3):
            fn()  # type: ignore[operator]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()  # type: ignore[operator]
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20 * 1000

    plain_us = timed(lambda: cuda.decode(q, k, v, meta, scale))
    cascade_us = timed(lambda: cascade.cascade_decode(cuda, q, k, v, meta.cascade, scale))
    print(f"\n256 seqs x (2048 shared + 1..200 own), 32 heads d128 fp16: plain decode "
          f"{plain_us:.0f} us, cascade {cascade_us:.0f} us ({plain_us / cascade_us:.2f}x)")
    assert cascade_us > 0
