"""A small sweep over every kernel of cacheflow-kernels, sized to run under compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 99 \
        python3 packages/cacheflow-kernels/tests/sanitizer_sweep.py
    compute-sanitizer --tool racecheck ... --only paged_attention,paged_prefill,norm,rotary

Each call's shapes are small but cover the kernels' edge paths: every dtype, head sizes with and
without a partial span (80, 96), block sizes 8/16/32, MHA/GQA/MQA, contexts of 1 token, of
lengths that are not multiples of the block size, and split-K partitions (forced partition
sizes); padded and out-of-range slots; ragged prefill with cached prefixes; unaligned rows
(element-wise paths), strided rotary rows and both rotary kernels (the pipelined one over
enough tokens to wrap its ring), the fused rotary + cache write against the two ops, decode
attention with the rotary + cache write inside it against the separate ops, skinny_gemm
(one and two rows, gated; compute capability 9.0+); FP8 E4M3 caches with K/V scales through
reshape_and_cache, both attention ops (soft-capped too), copy_blocks and swap_blocks (the "fp8"
sweep). Every output is checked against a torch reference
(a wrong value exits non-zero on its own), so the sweep is also a correctness run; the
sanitizer adds the memory checks. Run by tools/gpu_check.sh and by
test_kernels_sanitizer_gpu.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# paged_attention_testutil and prefill_testutil live beside this script (on sys.path).
import prefill_testutil as pf
import torch

import cacheflow_kernels as ck

import paged_attention_testutil as pa

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _close(got: Any, want: Any, dtype: Any, what: str) -> None:
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-4}[dtype]
    diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    if not diff <= tol * max(1.0, want.double().abs().max().item() if want.numel() else 1.0):
        raise AssertionError(f"{what}: max |diff| {diff:.3g} over tolerance")


def sweep_paged_attention() -> int:
    calls = 0
    shapes = [  # (ctx_lens, heads, kv_heads, head_size, block_size, partition_size)
        ([1, 17, 64], 4, 4, 64, 16, None),
        ([5, 300], 8, 2, 80, 8, None),
        ([33, 1100], 8, 1, 96, 32, 256),      # MQA, split into 5 partitions
        ([700, 1, 129], 16, 2, 128, 16, 64),  # GQA-8, many partitions, a 1-token context
        ([250], 4, 4, 256, 16, 128),
        ([40, 90], 2, 1, 112, 8, 0),
    ]
    for dtype in DTYPES:
        for ctx, heads, kv, d, bs, part in shapes:
            case = pa.make_case(ctx, num_heads=heads, num_kv_heads=kv, head_size=d,
                                block_size=bs, dtype=dtype, device="cuda", seed=calls,
                                alibi=calls % 3 == 0)
            window = 37 if calls % 4 == 1 else None
            ck.paged_attention(case["out"], case["query"], case["key_cache"],
                               case["value_cache"], case["block_tables"], case["context_lens"],
                               case["scale"], case["alibi_slopes"], max(ctx),
                               partition_size=part, sliding_window=window)
            want = pa.oracle(case["query"], case["key_cache"], case["value_cache"],
                             case["block_tables"], case["context_lens"], case["scale"],
                             case["alibi_slopes"], sliding_window=window)
            _close(case["out"], want, dtype, f"paged_attention {dtype} ctx{ctx} d{d} bs{bs}")
            calls += 1
    # CTAs of 32 query heads (each warp both row tiles) and of 16, each forced (the default picks
    # one by the grid's size), and CTAs of 4 warps forced (the small grids above take wide CTAs).
    for env, rows in (("CACHEFLOW_PA_ROWS", "32"), ("CACHEFLOW_PA_ROWS", "16"),
                      ("CACHEFLOW_PA_WARPS", "4")):
        os.environ[env] = rows
        try:
            for ctx, heads, kv, d, part in (([1, 45, 300], 32, 1, 128, None),
                                            ([700, 9], 48, 2, 64, 128)):
                case = pa.make_case(ctx, num_heads=heads, num_kv_heads=kv, head_size=d,
                                    dtype=torch.float16, device="cuda", seed=calls)
                ck.paged_attention(case["out"], case["query"], case["key_cache"],
                                   case["value_cache"], case["block_tables"],
                                   case["context_lens"], case["scale"], None, max(ctx),
                                   partition_size=part)
                want = pa.oracle(case["query"], case["key_cache"], case["value_cache"],
                                 case["block_tables"], case["context_lens"], case["scale"], None)
                _close(case["out"], want, torch.float16, f"paged_attention {env}={rows} d{d}")
                calls += 1
        finally:
            del os.environ[env]
    # Half-wide CTAs: an unsplit MQA grid of 16-row CTAs at about 1.5 per SM (sized from the
    # device's SM count; short contexts keep the sanitizers' run short).
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    os.environ["CACHEFLOW_PA_ROWS"] = "16"
    try:
        batch = -(-3 * sms // 4)
        ctx = [1 + (37 * i) % 90 for i in range(batch)]
        for dtype in (torch.float16, torch.bfloat16):
            case = pa.make_case(ctx, num_heads=32, num_kv_heads=1, head_size=128, dtype=dtype,
                                device="cuda", seed=calls)
            ck.paged_attention(case["out"], case["query"], case["key_cache"],
                               case["value_cache"], case["block_tables"], case["context_lens"],
                               case["scale"], None, max(ctx), partition_size=0)
            want = pa.oracle(case["query"], case["key_cache"], case["value_cache"],
                             case["block_tables"], case["context_lens"], case["scale"], None)
            _close(case["out"], want, dtype, f"paged_attention half-wide {dtype}")
            calls += 1
    finally:
        del os.environ["CACHEFLOW_PA_ROWS"]
    return calls


def sweep_paged_prefill() -> int:
    calls = 0
    shapes = [  # (q_lens, ctx_lens, heads, kv_heads, head_size, block_size)
        ([1, 7, 40], [1, 7, 40], 4, 4, 64, 16),
        ([16, 3], [50, 3], 8, 2, 128, 16),      # a cached prefix of 34 tokens
        ([70], [70], 4, 1, 96, 8),
        ([9, 33], [20, 100], 4, 2, 80, 32),
        ([24, 90], [24, 200], 2, 2, 256, 16),  # several 64-key tiles: one K buffer reloaded
        ([5, 6], [5, 6], 2, 1, 48, 16),         # a head size without tensor cores
    ]
    # The Hopper kernel's two schedules too (CACHEFLOW_PREFILL_VARIANT; compute capability 9.0
    # only, elsewhere the same calls would run the default kernels again).
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for variant in ["default", "wgmma", "wgmma_serial"] if hopper else ["default"]:
        if variant != "default":
            os.environ["CACHEFLOW_PREFILL_VARIANT"] = variant
        try:
            for dtype in DTYPES:
                for q_lens, ctx_lens, heads, kv, d, bs in shapes:
                    case = pf.make_case(q_lens, ctx_lens, num_heads=heads, num_kv_heads=kv,
                                        head_size=d, block_size=bs, dtype=dtype, device="cuda",
                                        seed=calls)
                    ck.paged_prefill_attention(*pf.call_args(case), case["scale"])
                    _close(case["out"], pf.reference(case), dtype,
                           f"paged_prefill_attention {variant} {dtype} q{q_lens} d{d}")
                    calls += 1
        finally:
            os.environ.pop("CACHEFLOW_PREFILL_VARIANT", None)
    return calls


def sweep_cache_ops() -> int:
    calls = 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in DTYPES:
        for bs, kv, d in ((8, 2, 64), (16, 3, 80), (32, 1, 128)):
            num_blocks = 6
            kc = torch.zeros(num_blocks, bs, kv, d, device="cuda", dtype=dtype)
            vc = torch.zeros_like(kc)
            n = 11
            key = torch.randn(n, kv, d, device="cuda", generator=gen).to(dtype)
            value = torch.randn(n, kv, d, device="cuda", generator=gen).to(dtype)
            slots = torch.randperm(num_blocks * bs, device="cuda", generator=gen)[:n]
            slots[3] = -1  # padding: skipped
            ck.reshape_and_cache(key, value, kc, vc, slots)
            keep = slots >= 0
            _close(kc.view(-1, kv, d)[slots[keep]], key[keep], dtype, "reshape_and_cache K")
            _close(vc.view(-1, kv, d)[slots[keep]], value[keep], dtype, "reshape_and_cache V")
            calls += 1
            keys = [torch.randn(num_blocks, bs, kv, d, device="cuda", generator=gen).to(dtype)
                    for _ in range(3)]
            values = [k.clone() + 1 for k in keys]
            mapping = torch.tensor([[0, 4], [2, 5], [1, 3]], device="cuda")
            want = [c.clone() for c in keys + values]
            for c in want:
                c[mapping[:, 1]] = c[mapping[:, 0]]
            ck.copy_blocks(keys, values, mapping)
            for got, ref in zip(keys + values, want):
                _close(got, ref, dtype, "copy_blocks")
            calls += 1
            cpu = torch.zeros(num_blocks, bs, kv, d, dtype=dtype).pin_memory()
            pairs = torch.tensor([[5, 0], [1, 2]])
            ck.swap_blocks(keys[0], cpu, pairs)
            torch.cuda.synchronize()
            _close(cpu[pairs[:, 1]].cuda(), keys[0][pairs[:, 0].cuda()], dtype, "swap d2h")
            back = torch.zeros_like(keys[0])
            ck.swap_blocks(cpu, back, pairs[:, [1, 0]].contiguous())
            torch.cuda.synchronize()
            _close(back[pairs[:, 0].cuda()], keys[0][pairs[:, 0].cuda()], dtype, "swap h2d")
            calls += 2
    return calls


def sweep_fp8() -> int:
    """FP8 caches: quantize on write (against torch's rounding), attention over them against the
    float64 oracle of the dequantized values, soft-capped, and bytewise block moves."""
    calls = 0
    fp8 = torch.float8_e4m3fn
    k_scale, v_scale = 0.04, 0.3
    gen = torch.Generator(device="cuda").manual_seed(5)
    shapes = [  # (ctx_lens, heads, kv_heads, head_size, block_size, partition_size)
        ([1, 17, 64], 4, 4, 64, 16, None),
        ([5, 300], 8, 2, 80, 8, None),
        ([700, 1, 129], 16, 2, 128, 16, 64),
        ([250, 33], 4, 1, 256, 32, 128),
    ]
    for dtype in DTYPES:
        for ctx, heads, kv, d, bs, part in shapes:
            case = pa.make_case(ctx, num_heads=heads, num_kv_heads=kv, head_size=d,
                                block_size=bs, dtype=dtype, device="cuda", seed=100 + calls)
            kc = pa.quantize_fp8(case["key_cache"], k_scale)
            vc = pa.quantize_fp8(case["value_cache"], v_scale)
            cap = 20.0 if calls % 2 else None
            ck.paged_attention(case["out"], case["query"], kc, vc, case["block_tables"],
                               case["context_lens"], case["scale"], None, max(ctx),
                               partition_size=part, k_scale=k_scale, v_scale=v_scale,
                               logits_soft_cap=cap)
            want = pa.oracle(case["query"], pa.dequantize_fp8(kc, k_scale),
                             pa.dequantize_fp8(vc, v_scale), case["block_tables"],
                             case["context_lens"], case["scale"], logits_soft_cap=cap)
            _close(case["out"], want, dtype, f"paged_attention fp8 {dtype} d{d} cap {cap}")
            calls += 1
        for q_lens, ctx_lens, heads, kv, d, bs in (([16, 3], [50, 3], 8, 2, 128, 16),
                                                   ([24], [24], 2, 2, 256, 16),
                                                   ([9, 33], [20, 100], 4, 2, 80, 32),
                                                   ([5, 6], [5, 6], 2, 1, 48, 16)):
            case = pf.make_case(q_lens, ctx_lens, num_heads=heads, num_kv_heads=kv,
                                head_size=d, block_size=bs, dtype=dtype, device="cuda",
                                seed=200 + calls)
            case["key_cache"] = pa.quantize_fp8(case["key_cache"], k_scale)
            case["value_cache"] = pa.quantize_fp8(case["value_cache"], v_scale)
            case["k_scale"], case["v_scale"] = k_scale, v_scale
            case["logits_soft_cap"] = 20.0 if calls % 2 else None
            ck.paged_prefill_attention(*pf.call_args(case), case["scale"], k_scale=k_scale,
                                       v_scale=v_scale, logits_soft_cap=case["logits_soft_cap"])
            _close(case["out"], pf.reference(case), dtype,
                   f"paged_prefill_attention fp8 {dtype} q{q_lens} d{d}")
            calls += 1
        for bs, kv, d in ((8, 2, 64), (16, 3, 80), (32, 1, 128)):
            num_blocks, n = 6, 11
            kc = torch.zeros(num_blocks, bs, kv, d, device="cuda", dtype=fp8)
            vc = torch.zeros_like(kc)
            key = (torch.randn(n, kv, d, device="cuda", generator=gen) * 8).to(dtype)
            value = torch.randn(n, kv, d, device="cuda", generator=gen).to(dtype)
            key[0, 0, :3] = torch.tensor([1e4, -1e4, 0.0])  # saturates at +-448
            slots = torch.randperm(num_blocks * bs, device="cuda", generator=gen)[:n]
            slots[3] = -1
            ck.reshape_and_cache(key, value, kc, vc, slots, k_scale, v_scale)
            keep = slots >= 0
            for cache, src, scale, name in ((kc, key, k_scale, "K"), (vc, value, v_scale, "V")):
                got = cache.view(-1, kv, d)[slots[keep]].view(torch.uint8)
                want = pa.quantize_fp8(src[keep], scale).view(torch.uint8)
                if not torch.equal(got, want):
                    raise AssertionError(f"reshape_and_cache fp8 {name} {dtype}: bytes differ")
            calls += 1
            keys = [kc.clone(), kc.clone()]
            values = [vc.clone(), vc.clone()]
            mapping = torch.tensor([[0, 4], [2, 5]], device="cuda")
            want = [c.view(torch.uint8).clone() for c in keys + values]
            for c in want:
                c[mapping[:, 1]] = c[mapping[:, 0]]
            ck.copy_blocks(keys, values, mapping)
            for got, ref in zip(keys + values, want):
                if not torch.equal(got.view(torch.uint8), ref):
                    raise AssertionError("copy_blocks fp8: bytes differ")
            cpu = torch.zeros(num_blocks, bs, kv, d, dtype=fp8).pin_memory()
            pairs = torch.tensor([[5, 0], [1, 2]])
            ck.swap_blocks(keys[0], cpu, pairs)
            torch.cuda.synchronize()
            if not torch.equal(cpu.view(torch.uint8)[pairs[:, 1]],
                               keys[0].view(torch.uint8)[pairs[:, 0].cuda()].cpu()):
                raise AssertionError("swap_blocks fp8 d2h: bytes differ")
            calls += 2
    return calls


def _rms(x: Any, w: Any, eps: float) -> Any:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def sweep_norm() -> int:
    calls = 0
    gen = torch.Generator(device="cuda").manual_seed(1)
    for dtype in DTYPES:
        # warp per token, block per token cached, uncached (long rows), and unaligned rows
        for tokens, hidden in ((5, 64), (3, 4096), (2, 40000), (4, 1001)):
            x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dtype)
            w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).to(dtype)
            out = torch.full_like(x, float("nan"))
            ck.rms_norm(out, x, w, 1e-6)
            _close(out, _rms(x, w, 1e-6), dtype, f"rms_norm [{tokens},{hidden}]")
            r = torch.randn_like(x)
            want_r = (x + r).to(dtype)
            want = _rms(want_r, w, 1e-6)
            ck.fused_add_rms_norm(x, r, w, 1e-6)
            _close(r, want_r, dtype, "fused_add_rms_norm residual")
            _close(x, want, dtype, "fused_add_rms_norm")
            calls += 2
    return calls


def _rotate(x: Any, cos: Any, sin: Any, head_size: int, rot_dim: int, neox: bool) -> Any:
    x = x.view(x.shape[0], -1, head_size).clone()
    rot = x[..., :rot_dim]
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    if neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x[..., :rot_dim] = rotated
    return x.flatten(1)


# (tokens, heads, kv heads, head size, rotary dims, row padding). The small cases cover partial
# rotary and strided rows; 3,000 tokens give every CTA of the pipelined kernel several tokens,
# so its shared-memory ring wraps around (racecheck's case).
ROTARY_CASES = ((9, 4, 2, 64, 64, 0), (9, 3, 1, 80, 32, 16), (9, 2, 2, 128, 128, 8),
                (9, 1, 1, 96, 96, 0), (3000, 32, 8, 128, 128, 0))


def sweep_rotary() -> int:
    """Every case under the default kernel choice (the 3,000-token case takes the pipelined
    kernel) and with CACHEFLOW_ROTARY=pipelined forced (one token per CTA on the small cases)."""
    calls = 0
    previous = os.environ.pop("CACHEFLOW_ROTARY", None)
    try:
        for variant in (None, "pipelined"):
            if variant is not None:
                os.environ["CACHEFLOW_ROTARY"] = variant
            calls += _sweep_rotary_cases()
    finally:
        os.environ.pop("CACHEFLOW_ROTARY", None)
        if previous is not None:
            os.environ["CACHEFLOW_ROTARY"] = previous
    return calls


def _sweep_rotary_cases() -> int:
    calls = 0
    gen = torch.Generator(device="cuda").manual_seed(2)
    max_pos = 64
    for dtype in DTYPES:
        for neox in (True, False):
            for n, heads, kv, d, rot, stride_pad in ROTARY_CASES:
                inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot))
                freqs = torch.arange(max_pos, device="cuda").float()[:, None] * inv[None]
                cache = torch.cat((freqs.cos(), freqs.sin()), -1).contiguous()
                pos = torch.randint(0, max_pos, (n,), device="cuda", generator=gen)
                pos[0] = max_pos + 3  # out of range: left untouched
                fused = torch.randn(n, (heads + kv) * d + stride_pad, device="cuda",
                                    generator=gen).to(dtype)
                q, k = fused[:, :heads * d], fused[:, heads * d:(heads + kv) * d]
                valid = pos < max_pos
                want_q, want_k = q.clone(), k.clone()
                c, s = cache[pos[valid], :rot // 2], cache[pos[valid], rot // 2:]
                want_q[valid] = _rotate(q[valid], c, s, d, rot, neox)
                want_k[valid] = _rotate(k[valid], c, s, d, rot, neox)
                ck.rotary_embedding(pos, q, k, cache, d, neox)
                _close(q, want_q, dtype, f"rotary q neox={neox} n{n} d{d} rot{rot}")
                _close(k, want_k, dtype, f"rotary k neox={neox} n{n} d{d} rot{rot}")
                calls += 1
    return calls


def sweep_activation() -> int:
    calls = 0
    F = torch.nn.functional
    gen = torch.Generator(device="cuda").manual_seed(3)
    for dtype in DTYPES:
        for tokens, d in ((3, 64), (5, 4096), (2, 1003)):
            x = torch.randn(tokens, 2 * d, device="cuda", generator=gen).to(dtype)
            out = torch.full((tokens, d), float("nan"), device="cuda", dtype=dtype)
            gate, up = x.float().chunk(2, -1)
            ck.silu_and_mul(out, x)
            _close(out, (F.silu(gate) * up).to(dtype), dtype, "silu_and_mul")
            for approx in ("none", "tanh"):
                ck.gelu_and_mul(out, x, approx)
                _close(out, (F.gelu(gate, approximate=approx) * up).to(dtype), dtype,
                       f"gelu_and_mul {approx}")
            flat = x[:, :d].contiguous()
            y = torch.full_like(flat, float("nan"))
            ck.gelu_new(y, flat)
            _close(y, F.gelu(flat.float(), approximate="tanh").to(dtype), dtype, "gelu_new")
            ck.gelu_fast(y, flat)
            _close(y, F.gelu(flat.float(), approximate="tanh").to(dtype), dtype, "gelu_fast")
            calls += 5
    return calls


# (tokens, heads, kv heads, head size, qkv row padding)
ROTARY_CACHE_CASES = ((1, 4, 4, 64, 0), (9, 8, 2, 128, 8), (5, 4, 1, 96, 16))


def sweep_rotary_cache() -> int:
    """rotary_embedding_with_cache against rotary_embedding + reshape_and_cache, byte for byte:
    both 16-bit dtypes and styles, 16-bit and FP8 caches, padded qkv rows, padding slots and an
    out-of-range position."""
    calls = 0
    gen = torch.Generator(device="cuda").manual_seed(6)
    max_pos = 64
    for dtype in (torch.float16, torch.bfloat16):
        for neox in (True, False):
            for cache_dtype in (dtype, torch.float8_e4m3fn):
                for n, heads, kv, d, pad in ROTARY_CACHE_CASES:
                    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
                    freqs = torch.arange(max_pos, device="cuda").float()[:, None] * inv[None]
                    table = torch.cat((freqs.cos(), freqs.sin()), -1).contiguous()
                    pos = torch.randint(0, max_pos, (n,), device="cuda", generator=gen)
                    pos[-1] = max_pos + 1
                    qkv = torch.randn(n, (heads + 2 * kv) * d + pad, device="cuda",
                                      generator=gen).to(dtype)
                    slots = torch.randperm(4 * 8, device="cuda", generator=gen)[:n]
                    slots[0] = -1
                    caches = [torch.zeros(4, 8, kv, d, device="cuda").to(cache_dtype)
                              for _ in range(4)]
                    scale = 1.0 if cache_dtype == dtype else 0.5
                    runs = []
                    for fused, (kc, vc) in ((False, caches[:2]), (True, caches[2:])):
                        x = qkv.clone()
                        q = x[:, :heads * d]
                        k = x[:, heads * d:(heads + kv) * d]
                        v = x[:, (heads + kv) * d:(heads + 2 * kv) * d]
                        if fused:
                            ck.rotary_embedding_with_cache(pos, q, k, v, table, d, neox, kc, vc,
                                                           slots, scale, scale)
                        else:
                            ck.rotary_embedding(pos, q, k, table, d, neox)
                            ck.reshape_and_cache(k.view(n, kv, d), v.view(n, kv, d), kc, vc,
                                                 slots, scale, scale)
                        runs.append((x, kc.view(torch.uint8), vc.view(torch.uint8)))
                    what = f"rotary_cache {dtype} neox={neox} cache {cache_dtype} n{n} d{d}"
                    for a, b in zip(runs[0], runs[1]):
                        if not torch.equal(a, b):
                            raise AssertionError(f"{what}: differs from the two ops")
                    calls += 1
    return calls


def sweep_attention_rotary_cache() -> int:
    """paged_attention_with_rotary_cache against rotary_embedding_with_cache + paged_attention,
    byte for byte (outputs and caches): both 16-bit dtypes and styles, 16-bit and FP8 caches,
    MHA / GQA / MQA at head sizes 64, 80 and 128, a one-token context, a padding slot."""
    calls = 0
    gen = torch.Generator(device="cuda").manual_seed(8)
    for dtype in (torch.float16, torch.bfloat16):
        for neox in (True, False):
            for fp8 in (False, True):
                for heads, kv, d in ((4, 4, 64), (8, 2, 80), (32, 1, 128)):
                    lens = [1, 37, 130]
                    case = pa.make_case(lens, num_heads=heads, num_kv_heads=kv, head_size=d,
                                        block_size=16, dtype=dtype, device="cuda", seed=d)
                    for name in ("key_cache", "value_cache"):
                        case[name] = torch.nan_to_num(case[name].float(), nan=0.5).to(dtype)
                        if fp8:
                            case[name] = pa.quantize_fp8(case[name], 0.5)
                    scale = 0.5 if fp8 else 1.0
                    n = len(lens)
                    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
                    freqs = torch.arange(256, device="cuda").float()[:, None] * inv[None]
                    table = torch.cat((freqs.cos(), freqs.sin()), -1).contiguous()
                    pos = torch.tensor([c + 2 for c in lens], device="cuda")
                    tables = case["block_tables"].cpu()
                    slots = torch.tensor([int(tables[s, (c - 1) // 16]) * 16 + (c - 1) % 16
                                          for s, c in enumerate(lens)], device="cuda")
                    slots[1] = -1
                    qkv = torch.randn(n, (heads + 2 * kv) * d, device="cuda",
                                      generator=gen).to(dtype)
                    runs = []
                    for fused in (False, True):
                        x = qkv.clone()
                        q = x[:, :heads * d]
                        k = x[:, heads * d:(heads + kv) * d]
                        v = x[:, (heads + kv) * d:]
                        kc, vc = case["key_cache"].clone(), case["value_cache"].clone()
                        out = torch.full((n, heads, d), float("nan"), device="cuda", dtype=dtype)
                        if fused:
                            assert ck.paged_attention_with_rotary_cache(
                                out, q.view(n, heads, d), k.view(n, kv, d), v.view(n, kv, d), kc,
                                vc, case["block_tables"], case["context_lens"], pos, slots,
                                table, neox, case["scale"], k_scale=scale, v_scale=scale)
                        else:
                            ck.rotary_embedding_with_cache(pos, q, k, v, table, d, neox, kc, vc,
                                                           slots, scale, scale)
                            ck.paged_attention(out, q.view(n, heads, d), kc, vc,
                                               case["block_tables"], case["context_lens"],
                                               case["scale"], k_scale=scale, v_scale=scale)
                        runs.append((out, kc.view(torch.uint8), vc.view(torch.uint8)))
                    what = f"attention_rotary_cache {dtype} neox={neox} fp8={fp8} d{d} {heads}/{kv}"
                    for a, b in zip(runs[0], runs[1]):
                        if not torch.equal(a, b):
                            raise AssertionError(f"{what}: differs from the two ops")
                    calls += 1
    return calls


def sweep_skinny() -> int:
    """skinny_gemm at one and two rows, with a bias, gated, and with the norm and the residual,
    against float64 (compute capability 9.0+; nothing to check elsewhere)."""
    from skinny_testutil import check, inputs

    if torch.cuda.get_device_capability() < (9, 0):
        return 0
    calls = 0
    for dtype in (torch.float16, torch.bfloat16):
        for m, n, k in ((1, 300, 512), (2, 77, 1024), (1, 4096, 64)):
            x, w, b = inputs(m, n, k, dtype, True, seed=n, device="cuda")
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            ck.skinny_gemm(out, x, w, b)
            check(out, x, w, b)
            gate_up = torch.randn(m, 2 * k, device="cuda").to(dtype)
            ck.skinny_gemm(out, gate_up, w, activation="silu")
            act = torch.empty(m, k, device="cuda", dtype=dtype)
            ck.silu_and_mul(act, gate_up)
            check(out, act, w, None)
            # The norm in the prologue and the residual in the epilogue (in place).
            norm_w = torch.ones(k, device="cuda", dtype=dtype)
            normed = torch.empty_like(x)
            ck.rms_norm(normed, x, norm_w, 1e-6)
            residual = torch.randn(m, n, device="cuda").to(dtype)
            want = residual.float() + (normed.double() @ w.double().T).float()
            ck.skinny_gemm(residual, x, w, norm_weight=norm_w, eps=1e-6, residual=residual)
            torch.testing.assert_close(residual.float(), want, rtol=2e-2, atol=2e-2)
            calls += 3
    return calls


SWEEPS: dict[str, Callable[[], int]] = {
    "paged_attention": sweep_paged_attention,
    "paged_prefill": sweep_paged_prefill,
    "cache_ops": sweep_cache_ops,
    "fp8": sweep_fp8,
    "norm": sweep_norm,
    "rotary": sweep_rotary,
    "rotary_cache": sweep_rotary_cache,
    "attention_rotary_cache": sweep_attention_rotary_cache,
    "skinny": sweep_skinny,
    "activation": sweep_activation,
}


def main(argv: list[str] | None = None) -> int:
    """Runs the selected sweeps; prints one line per sweep; exit status 0 when all pass."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated sweeps (default: all)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SWEEPS)
    unknown = sorted(set(names) - set(SWEEPS))
    if unknown:
        print(f"unknown sweeps {unknown}; known: {list(SWEEPS)}", file=sys.stderr)
        return 2
    if not ck.cuda_available():
        print("no CUDA device or kernel library: nothing run", file=sys.stderr)
        return 1
    for name in names:
        start = time.perf_counter()
        calls = SWEEPS[name]()
        torch.cuda.synchronize()
        print(f"{name}: {calls} calls checked in {time.perf_counter() - start:.1f} s",
              flush=True)
    print("sanitizer sweep: all outputs match their references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
