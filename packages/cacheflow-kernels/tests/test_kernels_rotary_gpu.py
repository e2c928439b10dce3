"""rotary_embedding on a CUDA device against plain torch (the runtime's RotaryEmbedding math).
Skipped without CUDA."""

from __future__ import annotations

from typing import Any

import pytest
from elementwise_testutil import tolerance

import cacheflow_kernels as ck

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
MAX_POSITION = 4096
# CACHEFLOW_ROTARY: "warp" (the warp-per-token kernel where it applies), "pipelined" (the
# pipelined persistent kernel where it applies), "block" (the block-per-token kernel everywhere)
# or unset ("default": pipelined where every CTA gets two tokens or more, else block).
KERNELS = ["warp", "pipelined", "block", "default"]


@pytest.fixture(params=KERNELS)
def kernel(request: Any, monkeypatch: Any) -> str:
    if request.param == "default":
        monkeypatch.delenv("CACHEFLOW_ROTARY", raising=False)
    else:
        monkeypatch.setenv("CACHEFLOW_ROTARY", request.param)
    return request.param


def cos_sin_cache(rot_dim: int, max_position: int = MAX_POSITION, base: float = 10000.0) -> Any:
    """[max_position, rot_dim] float32 [cos | sin], as the runtime's RotaryEmbedding builds it."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).cuda()


def reference_apply(x: Any, cos: Any, sin: Any, head_size: int, rot_dim: int,
                    is_neox: bool) -> Any:
    """The runtime's RotaryEmbedding._apply: x [T, H*D] -> rotated copy [T, H*D]."""
    num_tokens = x.shape[0]
    x = x.reshape(num_tokens, -1, head_size)
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1).reshape(num_tokens, -1)


def reference(positions: Any, query: Any, key: Any, cache: Any, head_size: int,
              is_neox: bool) -> tuple[Any, Any]:
    rot_dim = cache.shape[1]
    valid = (positions >= 0) & (positions < cache.shape[0])
    pos = positions.clamp(0, cache.shape[0] - 1)
    cos, sin = cache[pos, : rot_dim // 2], cache[pos, rot_dim // 2:]
    q = reference_apply(query, cos, sin, head_size, rot_dim, is_neox)
    k = reference_apply(key, cos, sin, head_size, rot_dim, is_neox)
    # Tokens with an out-of-range position are left untouched.
    q = torch.where(valid[:, None], q, query)
    k = torch.where(valid[:, None], k, key)
    return q, k


def random_case(dtype: Any, num_tokens: int, num_heads: int, num_kv_heads: int,
                head_size: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "positions": torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen, device="cuda"),
        "query": torch.randn(num_tokens, num_heads * head_size, generator=gen,
                             device="cuda").to(dtype),
        "key": torch.randn(num_tokens, num_kv_heads * head_size, generator=gen,
                           device="cuda").to(dtype),
    }


def run_and_compare(case: dict[str, Any], cache: Any, head_size: int, is_neox: bool) -> None:
    dtype = case["query"].dtype
    want_q, want_k = reference(case["positions"], case["query"], case["key"], cache, head_size,
                               is_neox)
    ck.rotary_embedding(case["positions"], case["query"], case["key"], cache, head_size, is_neox)
    torch.cuda.synchronize()
    torch.testing.assert_close(case["query"], want_q, **tolerance(dtype))
    torch.testing.assert_close(case["key"], want_k, **tolerance(dtype))


# (num_tokens, num_heads, num_kv_heads, head_size, rot_dim)
SHAPES = [
    (1, 1, 1, 64, 64),
    (7, 4, 2, 64, 64),
    (33, 32, 8, 128, 128),      # LLaMA-style GQA
    (5, 3, 1, 80, 80),          # head size 80
    (9, 2, 2, 128, 64),         # partial rotary (half)
    (11, 4, 4, 96, 32),         # partial rotary (a third)
    (6, 2, 1, 64, 24),          # rot_dim/2 = 12: element-wise neox path
    (4, 2, 2, 256, 256),
    (13, 5, 5, 6, 6),           # tiny odd head size: element-wise paths
    (3, 40, 40, 128, 128),      # more heads than threads of one block
    (8192, 32, 8, 128, 128),    # 8k tokens
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(("num_tokens", "num_heads", "num_kv_heads", "head_size", "rot_dim"),
                         SHAPES)
def test_matches_reference(kernel: str, dtype: Any, is_neox: bool, num_tokens: int,
                           num_heads: int, num_kv_heads: int, head_size: int,
                           rot_dim: int) -> None:
    case = random_case(dtype, num_tokens, num_heads, num_kv_heads, head_size)
    run_and_compare(case, cos_sin_cache(rot_dim), head_size, is_neox)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
def test_matches_torch_bit_for_bit(kernel: str, dtype: Any, is_neox: bool) -> None:
    """Each product and sum is rounded like torch's eager ops: no difference at all."""
    case = random_case(dtype, 64, 8, 2, 128)
    cache = cos_sin_cache(128)
    want_q, want_k = reference(case["positions"], case["query"], case["key"], cache, 128,
                               is_neox)
    ck.rotary_embedding(case["positions"], case["query"], case["key"], cache, 128, is_neox)
    torch.testing.assert_close(case["query"], want_q, rtol=0, atol=0)
    torch.testing.assert_close(case["key"], want_k, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("pad", [0, 1])
def test_slices_of_a_fused_qkv_tensor(kernel: str, dtype: Any, is_neox: bool, pad: int) -> None:
    """query and key as column slices of [num_tokens, q + k + v (+ pad)]: rotated through the
    row stride; v (and the padding) untouched. pad=1 makes the row stride odd (element-wise
    path)."""
    num_tokens, heads, kv_heads, head_size = 37, 8, 2, 128
    q_size, kv_size = heads * head_size, kv_heads * head_size
    gen = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size + pad, generator=gen,
                      device="cuda").to(dtype)
    original = qkv.clone()
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen, device="cuda")
    cache = cos_sin_cache(head_size)
    query, key = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size]
    want_q, want_k = reference(positions, query.clone(), key.clone(), cache, head_size, is_neox)
    ck.rotary_embedding(positions, query, key, cache, head_size, is_neox)
    torch.cuda.synchronize()
    torch.testing.assert_close(query, want_q, **tolerance(dtype))
    torch.testing.assert_close(key, want_k, **tolerance(dtype))
    torch.testing.assert_close(qkv[:, q_size + kv_size:], original[:, q_size + kv_size:],
                               rtol=0, atol=0)


@pytest.mark.parametrize("is_neox", [True, False])
def test_out_of_range_positions_leave_tokens_untouched(kernel: str, is_neox: bool) -> None:
    case = random_case(torch.float16, 16, 4, 2, 64)
    case["positions"][::3] = -1
    case["positions"][1] = MAX_POSITION
    case["positions"][4] = MAX_POSITION + 1000
    run_and_compare(case, cos_sin_cache(64), 64, is_neox)


@pytest.mark.parametrize("num_heads", [1, 7, 40, 96])
def test_warp_kernel_splits_heads_over_parts(num_heads: int) -> None:
    """The warp kernel's parts: heads that do not fill the lanes' slots (1, 7) and several parts
    per token (40 + 40 heads: 20 per lane; 96 + 96: 48), neox and gpt-j, 16-bit and float32."""
    for dtype in (torch.bfloat16, torch.float32):
        for is_neox in (True, False):
            case = random_case(dtype, 19, num_heads, num_heads, 128, seed=num_heads)
            run_and_compare(case, cos_sin_cache(128), 128, is_neox)


# (num_tokens, num_heads, num_kv_heads, head_size, rot_dim): several parts per token (more units
# than one CTA takes), partial rotary, few heads (the cos/sin loaders set the CTA size), more
# tokens than resident CTAs, a single token.
PIPELINED_SHAPES = [
    (19, 300, 300, 128, 128),
    (23, 40, 8, 128, 64),
    (5, 1, 1, 256, 256),
    (3000, 32, 8, 128, 128),
    (1, 4, 2, 64, 64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(("num_tokens", "num_heads", "num_kv_heads", "head_size", "rot_dim"),
                         PIPELINED_SHAPES)
def test_pipelined_kernel_matches_block_kernel_bit_for_bit(
        monkeypatch: Any, dtype: Any, is_neox: bool, num_tokens: int, num_heads: int,
        num_kv_heads: int, head_size: int, rot_dim: int) -> None:
    """CACHEFLOW_ROTARY=pipelined against the block kernel (and torch): identical bits, with
    out-of-range positions (tokens untouched) mixed in."""
    case = random_case(dtype, num_tokens, num_heads, num_kv_heads, head_size, seed=num_tokens)
    case["positions"][::7] = -1
    cache = cos_sin_cache(rot_dim)
    results = {}
    for variant in ("block", "pipelined"):
        monkeypatch.setenv("CACHEFLOW_ROTARY", variant)
        q, k = case["query"].clone(), case["key"].clone()
        ck.rotary_embedding(case["positions"], q, k, cache, head_size, is_neox)
        results[variant] = (q, k)
    torch.cuda.synchronize()
    for got, want in zip(results["pipelined"], results["block"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_q, want_k = reference(case["positions"], case["query"], case["key"], cache, head_size,
                               is_neox)
    torch.testing.assert_close(results["pipelined"][0], want_q, **tolerance(dtype))
    torch.testing.assert_close(results["pipelined"][1], want_k, **tolerance(dtype))


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pipelined_kernel_larger_smem_after_smaller(monkeypatch: Any, dtype: Any,
                                                    is_neox: bool) -> None:
    """A kernel's shared-memory limit only goes up: a shape that needs more shared memory, then
    one that needs less (both over 48 KB), then the first again all launch. (Setting the limit to
    each new size shrank it under the first one's, whose next launch failed with an invalid
    argument.) The pipelined kernel's shared memory grows with its threads, i.e. with the
    16-byte units of a token's part: 96 heads of 128 in 16-bit types take 384 threads, 64 heads
    256; in float32 96 heads split into two parts of 384 threads and 64 heads take 512."""
    large, small = (96, 64) if dtype != torch.float32 else (64, 96)
    for heads in (large, small, large):
        case = random_case(dtype, 300, heads - 8, 8, 128, seed=heads)
        cache = cos_sin_cache(128)
        results = {}
        for variant in ("pipelined", "block"):
            monkeypatch.setenv("CACHEFLOW_ROTARY", variant)
            q, k = case["query"].clone(), case["key"].clone()
            ck.rotary_embedding(case["positions"], q, k, cache, 128, is_neox)
            results[variant] = (q, k)
        for got, want in zip(results["pipelined"], results["block"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_repeated_positions() -> None:
    case = random_case(torch.bfloat16, 50, 4, 1, 128)
    case["positions"][:] = 7
    run_and_compare(case, cos_sin_cache(128), 128, True)


def test_rope_scaling_like_cache_is_used_as_given() -> None:
    """Any float32 table works (e.g. linear/llama3 scaling baked in): the kernel only reads it."""
    cache = cos_sin_cache(128) * 0.5
    case = random_case(torch.float32, 21, 4, 4, 128)
    run_and_compare(case, cache, 128, True)


def test_misaligned_query() -> None:
    case = random_case(torch.float16, 12, 4, 2, 64)
    buf = torch.empty(case["query"].numel() + 1, dtype=torch.float16, device="cuda")
    view = buf[1:].view(case["query"].shape)
    view.copy_(case["query"])
    case["query"] = view
    run_and_compare(case, cos_sin_cache(64), 64, True)
    run_and_compare(case, cos_sin_cache(64), 64, False)


def test_empty_batch() -> None:
    case = random_case(torch.float16, 0, 4, 2, 64)
    ck.rotary_embedding(case["positions"], case["query"], case["key"], cos_sin_cache(64), 64, True)
    torch.cuda.synchronize()


def test_runs_on_torch_current_stream() -> None:
    case = random_case(torch.float16, 512, 32, 8, 128)
    cache = cos_sin_cache(128)
    new_q = torch.randn_like(case["query"])
    want_q, want_k = reference(case["positions"], new_q, case["key"], cache, 128, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        case["query"].copy_(new_q)
        ck.rotary_embedding(case["positions"], case["query"], case["key"], cache, 128, True)
    torch.cuda.synchronize()
    torch.testing.assert_close(case["query"], want_q, **tolerance(torch.float16))
    torch.testing.assert_close(case["key"], want_k, **tolerance(torch.float16))


@pytest.mark.parametrize("is_neox", [True, False])
def test_cuda_graph_capture_and_replay(is_neox: bool) -> None:
    shape = (21, 8, 2, 128)
    static = random_case(torch.bfloat16, *shape)
    cache = cos_sin_cache(128)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (loads the library)
        ck.rotary_embedding(static["positions"], static["query"], static["key"], cache, 128,
                            is_neox)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.rotary_embedding(static["positions"], static["query"], static["key"], cache, 128,
                            is_neox)
    for seed in (1, 2):
        fresh = random_case(torch.bfloat16, *shape, seed=seed)
        want_q, want_k = reference(fresh["positions"], fresh["query"], fresh["key"], cache, 128,
                                   is_neox)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static["query"], want_q, **tolerance(torch.bfloat16))
        torch.testing.assert_close(static["key"], want_k, **tolerance(torch.bfloat16))
