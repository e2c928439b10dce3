"""rotary_embedding_with_cache on a CUDA device: bit for bit the result of rotary_embedding then
reshape_and_cache (query and key rotated in place, the caches written). Skipped without CUDA."""

from __future__ import annotations

from typing import Any

import pytest

import cacheflow_kernels as ck

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

MAX_POSITION = 2048


def cos_sin_cache(head_size: int, max_position: int = MAX_POSITION) -> Any:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_size, 2).float() / head_size))
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).cuda()


def make_case(num_tokens: int, num_heads: int, num_kv_heads: int, head_size: int,
              dtype: Any, cache_dtype: Any, block_size: int = 16, pad: int = 0,
              seed: int = 0) -> dict[str, Any]:
    """Query, key and value as slices of one fused qkv tensor (rows ``pad`` elements longer),
    distinct random slots in a cache with room to spare, positions within the table."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size + pad, device="cuda", dtype=torch.float32,
                      generator=g).mul_(3).to(dtype)
    num_blocks = (2 * num_tokens + block_size - 1) // block_size + 1
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=g)[:num_tokens]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    fill = torch.randn(cache_shape, device="cuda", generator=g).to(dtype)
    return {
        "positions": torch.randint(0, MAX_POSITION, (num_tokens,), device="cuda", generator=g),
        "qkv": qkv, "q_size": q_size, "kv_size": kv_size, "head_size": head_size,
        "num_kv_heads": num_kv_heads,
        "cos_sin_cache": cos_sin_cache(head_size),
        "key_cache": fill.to(cache_dtype), "value_cache": (-fill).to(cache_dtype),
        "slot_mapping": slots.to(torch.int64),
    }


def split(case: dict[str, Any]) -> tuple[Any, Any, Any]:
    q_size, kv_size = case["q_size"], case["kv_size"]
    qkv = case["qkv"]
    return (qkv[:, :q_size], qkv[:, q_size:q_size + kv_size],
            qkv[:, q_size + kv_size:q_size + 2 * kv_size])


def clone(case: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def run_two_ops(case: dict[str, Any], is_neox: bool, k_scale: float, v_scale: float) -> None:
    q, k, v = split(case)
    d, kv = case["head_size"], case["num_kv_heads"]
    ck.rotary_embedding(case["positions"], q, k, case["cos_sin_cache"], d, is_neox)
    ck.reshape_and_cache(k.view(-1, kv, d), v.view(-1, kv, d), case["key_cache"],
                         case["value_cache"], case["slot_mapping"], k_scale, v_scale)


def run_fused(case: dict[str, Any], is_neox: bool, k_scale: float, v_scale: float) -> None:
    q, k, v = split(case)
    ck.rotary_embedding_with_cache(case["positions"], q, k, v, case["cos_sin_cache"],
                                   case["head_size"], is_neox, case["key_cache"],
                                   case["value_cache"], case["slot_mapping"], k_scale, v_scale)


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert torch.equal(a["qkv"], b["qkv"])
    for name in ("key_cache", "value_cache"):
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def check(case: dict[str, Any], is_neox: bool, k_scale: float = 1.0,
          v_scale: float = 1.0) -> None:
    want, got = clone(case), clone(case)
    run_two_ops(want, is_neox, k_scale, v_scale)
    run_fused(got, is_neox, k_scale, v_scale)
    torch.cuda.synchronize()
    assert not torch.equal(want["qkv"], case["qkv"])  # something was rotated
    assert_same(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("heads", [(32, 32), (32, 8), (8, 1)])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_same_bits_as_the_two_ops(dtype: Any, is_neox: bool, heads: tuple[int, int],
                                  num_tokens: int) -> None:
    check(make_case(num_tokens, *heads, 128, dtype, dtype), is_neox)


@pytest.mark.parametrize("head_size", [64, 80, 96, 256])
@pytest.mark.parametrize("is_neox", [True, False])
def test_other_head_sizes(head_size: int, is_neox: bool) -> None:
    check(make_case(33, 8, 2, head_size, torch.float16, torch.float16), is_neox)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 2.5)])
def test_fp8_cache(dtype: Any, is_neox: bool, scales: tuple[float, float]) -> None:
    check(make_case(45, 16, 4, 128, dtype, torch.float8_e4m3fn), is_neox, *scales)


@pytest.mark.parametrize("pad", [8, 24])
@pytest.mark.parametrize("block_size", [8, 32])
def test_padded_qkv_rows_and_block_sizes(pad: int, block_size: int) -> None:
    check(make_case(19, 12, 4, 128, torch.bfloat16, torch.bfloat16, block_size, pad), True)


def test_negative_slots_and_out_of_range_positions() -> None:
    case = make_case(64, 8, 8, 128, torch.float16, torch.float16)
    case["slot_mapping"][::3] = -1
    case["positions"][1::5] = MAX_POSITION + 7
    case["positions"][2::5] = -3
    check(case, True)
    # Padding tokens leave the cache alone, and an out-of-range position rotates nothing.
    got = clone(case)
    run_fused(got, True, 1.0, 1.0)
    keep = case["slot_mapping"] < 0
    written = got["key_cache"].view(-1, 8 * 128)[case["slot_mapping"][~keep]]
    untouched = torch.ones(got["key_cache"].view(-1, 8 * 128).shape[0], dtype=torch.bool,
                           device="cuda")
    untouched[case["slot_mapping"][~keep]] = False
    assert torch.equal(got["key_cache"].view(-1, 8 * 128)[untouched],
                       case["key_cache"].view(-1, 8 * 128)[untouched])
    assert written.shape[0] == int((~keep).sum())
    stay = (case["positions"] < 0) | (case["positions"] >= MAX_POSITION)
    assert torch.equal(got["qkv"][stay], case["qkv"][stay])


def test_cuda_graph_capture_and_replay() -> None:
    case = make_case(16, 32, 8, 128, torch.float16, torch.float16)
    want = clone(case)
    run_two_ops(want, True, 1.0, 1.0)
    got = clone(case)
    fresh = clone(case)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run_fused(clone(case), True, 1.0, 1.0)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_fused(got, True, 1.0, 1.0)
    for name in ("qkv", "key_cache", "value_cache", "positions", "slot_mapping"):
        got[name].copy_(fresh[name])
    graph.replay()
    torch.cuda.synchronize()
    assert_same(got, want)


def test_misaligned_rows_are_rejected() -> None:
    case = make_case(4, 4, 4, 128, torch.float16, torch.float16, pad=4)
    with pytest.raises(ValueError, match="rotary_embedding_with_cache: argument 'query' must be"):
        run_fused(case, True, 1.0, 1.0)


def test_empty_batch() -> None:
    case = make_case(1, 4, 4, 64, torch.float16, torch.float16)
    empty = {k: (v[:0] if k in ("qkv", "positions", "slot_mapping") else v)
             for k, v in case.items()}
    before = case["key_cache"].clone()
    run_fused(empty, True, 1.0, 1.0)
    torch.cuda.synchronize()
    assert torch.equal(case["key_cache"], before)
