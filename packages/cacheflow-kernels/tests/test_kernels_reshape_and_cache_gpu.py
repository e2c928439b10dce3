"""reshape_and_cache on a CUDA device against a plain-torch reference (skipped without CUDA)."""

from __future__ import annotations

from typing import Any

import pytest

import cacheflow_kernels

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def reference(
    key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any
) -> tuple[Any, Any]:
    """Plain torch: copies of the caches with the rows of non-negative slots written."""
    num_blocks, block_size, num_heads, head_size = key_cache.shape
    k_ref, v_ref = key_cache.clone(), value_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_ref.view(num_blocks * block_size, num_heads, head_size)[slots] = key[keep]
    v_ref.view(num_blocks * block_size, num_heads, head_size)[slots] = value[keep]
    return k_ref, v_ref


def random_case(
    dtype: Any, num_tokens: int, num_heads: int, head_size: int, num_blocks: int,
    block_size: int, seed: int = 0, pad_every: int = 4,
) -> dict[str, Any]:
    """Random inputs, NaN-poisoned caches, distinct slots with some negative (padding)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (num_tokens, num_heads, head_size)
    key = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    value = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    cache_shape = (num_blocks, block_size, num_heads, head_size)
    key_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device="cuda")
    value_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device="cuda")
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:num_tokens]
    slots = slots.to(torch.int64)
    slots[::pad_every] = -1
    return {"key": key, "value": value, "key_cache": key_cache, "value_cache": value_cache,
            "slot_mapping": slots}


def run_and_compare(case: dict[str, Any]) -> None:
    k_ref, v_ref = reference(**case)
    cacheflow_kernels.reshape_and_cache(**case)
    torch.cuda.synchronize()
    torch.testing.assert_close(case["key_cache"], k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(case["value_cache"], v_ref, rtol=0, atol=0, equal_nan=True)


def test_cuda_available() -> None:
    assert cacheflow_kernels.cuda_available() is True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "head_size", "num_blocks", "block_size"),
    [
        (37, 8, 128, 7, 16),   # 16-byte copies; tokens not a multiple of the block size
        (5, 2, 64, 3, 16),     # fewer tokens than one block
        (100, 4, 80, 9, 16),   # head size 80
        (19, 1, 6, 5, 5),      # 12/24-byte rows: 4- and 8-byte copies
        (13, 3, 3, 4, 7),      # odd rows: 2- and 4-byte copies
        (300, 32, 128, 20, 32),  # rows wider than one CUDA block of threads
    ],
)
def test_matches_reference(
    dtype: Any, num_tokens: int, num_heads: int, head_size: int, num_blocks: int,
    block_size: int,
) -> None:
    run_and_compare(random_case(dtype, num_tokens, num_heads, head_size, num_blocks, block_size))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_slots_negative_writes_nothing(dtype: Any) -> None:
    case = random_case(dtype, 9, 2, 16, 3, 4)
    case["slot_mapping"].fill_(-1)
    run_and_compare(case)
    assert torch.isnan(case["key_cache"]).all() and torch.isnan(case["value_cache"]).all()


def test_empty_batch() -> None:
    run_and_compare(random_case(torch.float16, 0, 2, 16, 3, 4))


def test_fills_every_slot() -> None:
    case = random_case(torch.bfloat16, 48, 4, 32, 3, 16)
    case["slot_mapping"] = torch.randperm(48, device="cuda")  # a permutation of all slots
    run_and_compare(case)
    assert not torch.isnan(case["key_cache"]).any()


def test_misaligned_views_fall_back_to_narrow_copies() -> None:
    """Inputs starting 2 bytes into an allocation cannot use 16-byte copies."""
    case = random_case(torch.float16, 11, 4, 64, 4, 8)
    numel = case["key"].numel()
    for name in ("key", "value"):
        buf = torch.empty(numel + 1, dtype=torch.float16, device="cuda")
        view = buf[1:].view(case[name].shape)
        view.copy_(case[name])
        case[name] = view
    run_and_compare(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "head_size", "extra"), [(8, 128, 48), (2, 80, 3), (3, 5, 1)])
def test_strided_token_rows(dtype: Any, num_heads: int, head_size: int, extra: int) -> None:
    """key and value as views into one fused QKV output (row stride = query + key + value
    widths, and odd widths that force narrower copy words) are written as their contiguous
    copies would be; the FP8 cache quantizes the same values."""
    case = random_case(dtype, 37, num_heads, head_size, num_blocks=8, block_size=16, seed=5)
    row = num_heads * head_size
    fused = torch.full((37, extra * head_size + 2 * row), float("nan"), dtype=dtype,
                       device="cuda")
    base = extra * head_size
    fused[:, base: base + row] = case["key"].reshape(37, row)
    fused[:, base + row:] = case["value"].reshape(37, row)
    key = fused[:, base: base + row].view(37, num_heads, head_size)
    value = fused[:, base + row:].view(37, num_heads, head_size)
    assert not key.is_contiguous() and not value.is_contiguous()
    run_and_compare(dict(case, key=key, value=value))
    if dtype == torch.float32:
        return
    caches = [torch.zeros(8, 16, num_heads, head_size, dtype=torch.float8_e4m3fn, device="cuda")
              for _ in range(4)]
    cacheflow_kernels.reshape_and_cache(key, value, caches[0], caches[1], case["slot_mapping"],
                                        0.5, 0.25)
    cacheflow_kernels.reshape_and_cache(key.contiguous(), value.contiguous(), caches[2],
                                        caches[3], case["slot_mapping"], 0.5, 0.25)
    torch.cuda.synchronize()
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))


def test_strided_heads_are_rejected() -> None:
    case = random_case(torch.float16, 4, 2, 64, num_blocks=2, block_size=16)
    case["key"] = case["key"].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="argument 'key' must be contiguous, or rows of"):
        cacheflow_kernels.reshape_and_cache(**case)


def test_runs_on_torch_current_stream() -> None:
    """Inputs are rewritten on a busy side stream just before the call: a kernel launched on
    any other stream would read the old inputs."""
    case = random_case(torch.float16, 64, 8, 128, 8, 16)
    new_key, new_value = torch.randn_like(case["key"]), torch.randn_like(case["value"])
    k_ref, v_ref = reference(new_key, new_value, case["key_cache"], case["value_cache"],
                             case["slot_mapping"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        case["key"].copy_(new_key)
        case["value"].copy_(new_value)
        cacheflow_kernels.reshape_and_cache(**case)
    torch.cuda.synchronize()
    torch.testing.assert_close(case["key_cache"], k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(case["value_cache"], v_ref, rtol=0, atol=0, equal_nan=True)


def test_cuda_graph_capture_and_replay() -> None:
    case = random_case(torch.float16, 21, 4, 64, 5, 16)
    static = {k: v.clone() for k, v in case.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cacheflow_kernels.reshape_and_cache(**static)  # warm-up (loads the library)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cacheflow_kernels.reshape_and_cache(**static)
    fresh = random_case(torch.float16, 21, 4, 64, 5, 16, seed=1)
    for name, tensor in fresh.items():
        static[name].copy_(tensor)
    k_ref, v_ref = reference(**fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static["key_cache"], k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(static["value_cache"], v_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_second_device_while_first_is_current() -> None:
    with torch.cuda.device(1):
        case = {k: v.to("cuda:1") for k, v in random_case(torch.float32, 17, 2, 32, 4, 8).items()}
    k_ref, v_ref = reference(**case)
    torch.cuda.set_device(0)
    cacheflow_kernels.reshape_and_cache(**case)
    torch.cuda.synchronize(1)
    torch.testing.assert_close(case["key_cache"], k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(case["value_cache"], v_ref, rtol=0, atol=0, equal_nan=True)
