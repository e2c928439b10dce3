"""copy_blocks and swap_blocks on a CUDA device against plain torch indexing. Skipped without
CUDA."""

from __future__ import annotations

from typing import Any

import pytest

import cacheflow_kernels as ck
from cacheflow_kernels._lib import get_function

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _caches(num_layers: int, shape: tuple[int, ...], dtype: Any, seed: int = 0) -> list[Any]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, generator=gen, device="cuda").to(dtype) for _ in range(num_layers)]


def _pairs(num_blocks: int, num_pairs: int, seed: int = 0) -> Any:
    """int64 [num_pairs, 2]: distinct sources and distinct destinations, no block both."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)
    return torch.stack([perm[:num_pairs], perm[num_pairs:2 * num_pairs]], dim=1).to(torch.int64)


def reference_copy(caches: list[Any], mapping: Any) -> list[Any]:
    out = [c.clone() for c in caches]
    src, dst = mapping[:, 0].cpu(), mapping[:, 1].cpu()
    num_blocks = caches[0].shape[0] if caches else 0
    keep = (src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks)
    for c in out:
        c[dst[keep].to(c.device)] = c[src[keep].to(c.device)]
    return out


def _poison_destinations(caches: list[Any], mapping: Any) -> None:
    """NaN in the destination block of every valid pair, so a missed copy shows."""
    num_blocks = caches[0].shape[0]
    src, dst = mapping[:, 0].cpu(), mapping[:, 1].cpu()
    dst = dst[(src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks)]
    for c in caches:
        c[dst.to(c.device)] = float("nan")


def _check_copy(keys: list[Any], values: list[Any], mapping: Any) -> None:
    _poison_destinations(keys, mapping)
    _poison_destinations(values, mapping)
    want_k, want_v = reference_copy(keys, mapping), reference_copy(values, mapping)
    ck.copy_blocks(keys, values, mapping.cuda())
    torch.cuda.synchronize()
    for got, want in zip(keys + values, want_k + want_v):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert not torch.isnan(got).any()


# (num_layers, num_blocks, block_size, num_kv_heads, head_size, num_pairs)
COPY_SHAPES = [
    (1, 4, 16, 8, 128, 1),
    (32, 64, 16, 8, 128, 20),   # LLaMA-style: 32 layers, 32 KB blocks (fp16)
    (3, 10, 3, 1, 5, 4),        # 15-element blocks: 2-, 4- or 8-byte words by dtype
    (2, 9, 1, 1, 1, 4),         # one element per block
    (5, 40, 32, 4, 80, 17),
    (2, 600, 16, 2, 64, 300),   # many pairs
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layers", "blocks", "block_size", "heads", "head_size", "pairs"),
                         COPY_SHAPES)
def test_copy_blocks_matches_reference(dtype: Any, layers: int, blocks: int, block_size: int,
                                       heads: int, head_size: int, pairs: int) -> None:
    shape = (blocks, block_size, heads, head_size)
    keys = _caches(layers, shape, dtype, seed=1)
    values = _caches(layers, shape, dtype, seed=2)
    _check_copy(keys, values, _pairs(blocks, pairs))


def test_copy_blocks_more_layers_than_one_launch_holds() -> None:
    """More than 240 layers: one launch per 240 layers, all copied."""
    shape = (6, 2, 1, 8)
    keys = _caches(250, shape, torch.float16, seed=3)
    values = _caches(250, shape, torch.float16, seed=4)
    _check_copy(keys, values, _pairs(6, 3))


def test_copy_blocks_skips_out_of_range_pairs() -> None:
    shape = (8, 4, 2, 16)
    keys = _caches(2, shape, torch.float32)
    values = _caches(2, shape, torch.float32, seed=1)
    mapping = torch.tensor([[0, 5], [-1, 6], [1, 8], [2, 7], [100, 3]], dtype=torch.int64)
    before_k = [k.clone() for k in keys]
    _check_copy(keys, values, mapping)
    for got, old in zip(keys, before_k):
        torch.testing.assert_close(got[[3, 6]], old[[3, 6]], rtol=0, atol=0)


def test_copy_blocks_misaligned_layer() -> None:
    """A layer view starting 2 bytes into its allocation forces narrow words for all layers."""
    shape = (6, 4, 2, 8)
    keys = _caches(2, shape, torch.float16)
    values = _caches(2, shape, torch.float16, seed=1)
    buf = torch.empty(keys[1].numel() + 1, dtype=torch.float16, device="cuda")
    view = buf[1:].view(shape)
    view.copy_(keys[1])
    keys[1] = view
    _check_copy(keys, values, _pairs(6, 3))


def test_copy_blocks_empty() -> None:
    shape = (4, 2, 1, 8)
    keys = _caches(2, shape, torch.float16)
    values = _caches(2, shape, torch.float16)
    before = [k.clone() for k in keys]
    ck.copy_blocks(keys, values, torch.zeros(0, 2, dtype=torch.int64, device="cuda"))
    ck.copy_blocks([], [], torch.zeros(3, 2, dtype=torch.int64, device="cuda"))
    torch.cuda.synchronize()
    for got, old in zip(keys, before):
        torch.testing.assert_close(got, old, rtol=0, atol=0)


def test_copy_blocks_cuda_graph_capture_and_replay() -> None:
    shape = (32, 16, 4, 64)
    keys = _caches(4, shape, torch.bfloat16)
    values = _caches(4, shape, torch.bfloat16, seed=1)
    mapping = _pairs(32, 5).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ck.copy_blocks(keys, values, mapping)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.copy_blocks(keys, values, mapping)
    for seed in (7, 8):
        new_mapping = _pairs(32, 5, seed=seed)
        fresh_k = _caches(4, shape, torch.bfloat16, seed=seed)
        fresh_v = _caches(4, shape, torch.bfloat16, seed=seed + 50)
        for dst, src in zip(keys + values, fresh_k + fresh_v):
            dst.copy_(src)
        mapping.copy_(new_mapping)
        want = reference_copy(keys, new_mapping) + reference_copy(values, new_mapping)
        graph.replay()
        torch.cuda.synchronize()
        for got, exp in zip(keys + values, want):
            torch.testing.assert_close(got, exp, rtol=0, atol=0)


def test_copy_blocks_runs_on_torch_current_stream() -> None:
    shape = (64, 16, 8, 128)
    keys = _caches(8, shape, torch.float16)
    values = _caches(8, shape, torch.float16, seed=1)
    mapping = _pairs(64, 20)
    new_keys = _caches(8, shape, torch.float16, seed=5)
    want = reference_copy(new_keys, mapping)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        for k, n in zip(keys, new_keys):
            k.copy_(n)
        ck.copy_blocks(keys, values, mapping.cuda())
    torch.cuda.synchronize()
    for got, exp in zip(keys, want):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


# ---- swap_blocks ----

def _pinned_like(shape: tuple[int, ...], dtype: Any, fill: float = float("nan")) -> Any:
    return torch.full(shape, fill, dtype=dtype).pin_memory()


def _reference_swap(src: Any, dst: Any, mapping: Any) -> Any:
    want = dst.clone().cpu()
    want[mapping[:, 1]] = src.cpu()[mapping[:, 0]]
    return want


SWAP_MAPPINGS = {
    "scattered": torch.tensor([[3, 0], [0, 5], [7, 2]], dtype=torch.int64),
    "runs": torch.tensor([[2, 4], [3, 5], [4, 6], [0, 0], [9, 1], [10, 2]], dtype=torch.int64),
    "one": torch.tensor([[11, 7]], dtype=torch.int64),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu", "gpu_to_gpu"])
@pytest.mark.parametrize("mapping_name", list(SWAP_MAPPINGS))
def test_swap_blocks_matches_reference(dtype: Any, direction: str, mapping_name: str) -> None:
    block = (16, 4, 64)
    mapping = SWAP_MAPPINGS[mapping_name]
    gen = torch.Generator().manual_seed(0)
    data = torch.randn((12, *block), generator=gen).to(dtype)
    if direction == "gpu_to_cpu":
        src, dst = data.cuda(), _pinned_like((8, *block), dtype)
    elif direction == "cpu_to_gpu":
        src, dst = data.pin_memory(), torch.full((8, *block), float("nan"), dtype=dtype,
                                                 device="cuda")
    else:
        src, dst = data.cuda(), torch.full((8, *block), float("nan"), dtype=dtype, device="cuda")
    want = _reference_swap(src, dst, mapping)
    ck.swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    torch.testing.assert_close(dst.cpu(), want, rtol=0, atol=0, equal_nan=True)
    written = dst.cpu()[mapping[:, 1]]
    assert not torch.isnan(written).any()


def test_swap_blocks_rejects_out_of_range_before_copying() -> None:
    src = torch.randn(4, 8, device="cuda")
    dst = _pinned_like((4, 8), torch.float32)
    for bad in ([[0, 1], [4, 0]], [[0, 1], [1, 4]], [[-1, 0]]):
        with pytest.raises(ValueError, match="swap_blocks: argument 'block_mapping' must be "
                                             "pairs"):
            ck.swap_blocks(src, dst, torch.tensor(bad, dtype=torch.int64))
    torch.cuda.synchronize()
    assert torch.isnan(dst).all()  # the valid first pair was not copied either


def test_swap_blocks_rejects_pageable_host_memory() -> None:
    src = torch.randn(4, 8, device="cuda")
    dst = torch.zeros(4, 8)
    mapping = torch.tensor([[0, 1]], dtype=torch.int64)
    with pytest.raises(ValueError, match="swap_blocks: argument 'dst' must be in pinned"):
        ck.swap_blocks(src, dst, mapping)
    # The library checks it too (bypassing the Python checks).
    with pytest.raises(ValueError, match="argument 'dst' must be in pinned"):
        get_function("swap_blocks")(src, dst, mapping)


def test_swap_blocks_mapping_on_gpu_is_rejected() -> None:
    src = torch.randn(4, 8, device="cuda")
    dst = _pinned_like((4, 8), torch.float32)
    with pytest.raises(ValueError, match="argument 'block_mapping' must be a CPU tensor"):
        ck.swap_blocks(src, dst, torch.tensor([[0, 1]], dtype=torch.int64, device="cuda"))


def test_swap_blocks_empty_mapping() -> None:
    src = torch.randn(4, 8, device="cuda")
    dst = _pinned_like((4, 8), torch.float32)
    ck.swap_blocks(src, dst, torch.zeros(0, 2, dtype=torch.int64))
    torch.cuda.synchronize()
    assert torch.isnan(dst).all()


@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu"])
def test_swap_blocks_runs_on_torch_current_stream(direction: str) -> None:
    """The CUDA side is rewritten on a busy side stream just before the call."""
    block = (16, 8, 128)
    mapping = torch.tensor([[0, 1], [1, 2], [5, 0]], dtype=torch.int64)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    new = torch.randn(8, *block, device="cuda", dtype=torch.float16)
    if direction == "gpu_to_cpu":
        src = torch.randn(8, *block, device="cuda", dtype=torch.float16)
        dst = _pinned_like((4, *block), torch.float16)
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)
            src.copy_(new)
            ck.swap_blocks(src, dst, mapping)
        torch.cuda.synchronize()
        want = _reference_swap(new, torch.full_like(dst, float("nan")), mapping)
        torch.testing.assert_close(dst, want, rtol=0, atol=0, equal_nan=True)
    else:
        src = torch.randn(8, *block, dtype=torch.float16).pin_memory()
        dst = torch.full((4, *block), float("nan"), device="cuda", dtype=torch.float16)
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)
            dst.fill_(1.0)  # queued before the copy on the same stream: the copy lands last
            ck.swap_blocks(src, dst, mapping)
        torch.cuda.synchronize()
        want = _reference_swap(src, torch.ones(4, *block, dtype=torch.float16), mapping)
        torch.testing.assert_close(dst.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu", "gpu_to_gpu"])
def test_swap_blocks_many_scattered_pairs(direction: str) -> None:
    """300 scattered pairs: the copy kernel, in two launches (240 pairs per launch)."""
    block = (16, 2, 64)
    gen = torch.Generator().manual_seed(3)
    mapping = torch.stack([torch.randperm(400, generator=gen)[:300],
                           torch.randperm(500, generator=gen)[:300]], dim=1).contiguous()
    data = torch.randn((400, *block), generator=gen).to(torch.bfloat16)
    if direction == "gpu_to_cpu":
        src, dst = data.cuda(), _pinned_like((500, *block), torch.bfloat16)
    elif direction == "cpu_to_gpu":
        src = data.pin_memory()
        dst = torch.full((500, *block), float("nan"), dtype=torch.bfloat16, device="cuda")
    else:
        src = data.cuda()
        dst = torch.full((500, *block), float("nan"), dtype=torch.bfloat16, device="cuda")
    want = _reference_swap(src, dst, mapping)
    ck.swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    torch.testing.assert_close(dst.cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(dst.cpu()).any()  # blocks outside the mapping untouched


@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu"])
def test_swap_blocks_repeated_dst_copies_in_order(direction: str) -> None:
    """A dst named twice gets the later pair's block, as copies in mapping order would."""
    block = (8, 1, 32)
    data = torch.arange(6 * 256, dtype=torch.float32).view(6, *block)
    mapping = torch.tensor([[0, 1], [2, 3], [4, 1], [5, 0]], dtype=torch.int64)
    if direction == "gpu_to_cpu":
        src, dst = data.cuda(), _pinned_like((4, *block), torch.float32)
    else:
        src = data.pin_memory()
        dst = torch.full((4, *block), float("nan"), device="cuda")
    ck.swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    got = dst.cpu()
    assert torch.equal(got[1], data[4]) and torch.equal(got[3], data[2])
    assert torch.equal(got[0], data[5]) and torch.isnan(got[2]).all()


def test_swap_blocks_offset_view_of_pinned_memory() -> None:
    """A pinned view that starts inside its allocation: the kernel's device address of it must
    carry the view's offset."""
    block = (16, 1, 64)
    base = torch.full((10, *block), float("nan"), dtype=torch.float16).pin_memory()
    dst = base[3:]  # starts 3 blocks into the pinned allocation
    src = torch.randn(5, *block, device="cuda", dtype=torch.float16)
    mapping = torch.tensor([[4, 0], [1, 5], [0, 2]], dtype=torch.int64)
    ck.swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    host = src.cpu()
    for s, d in mapping.tolist():
        assert torch.equal(dst[d], host[s])
    assert torch.isnan(base[:3]).all() and torch.isnan(base[4]).all()
