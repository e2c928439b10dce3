"""paged_prefill_attention's kernels run on the CPU under a host emulation of their warp-level
primitives (tests/emulation/prefill_emu.h), against the runtime's reference backend.

The kernel source is compiled unchanged with g++ (``-DCACHEFLOW_PREFILL_EMULATE``): every CUDA
thread is a fiber, ldmatrix / mma.sync / shuffles compute what the PTX ISA specifies per lane,
cp.async copies land only when a wait lets them, and shared memory starts as NaN. This checks the
fragment layouts, the block-table gather, masking, the online softmax and the pipeline's waits
and barriers on machines without a GPU (CI); timing and the real hardware are the GPU tests' job.
"""

from __future__ import annotations

import ctypes
from typing import Any

import emulator_builds
import pytest
from prefill_testutil import call_args, check_close, make_case, reference

from paged_attention_testutil import quantize_fp8

torch = pytest.importorskip("torch")
pytest.importorskip("cacheflow_runtime")

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


# Started as collection ends (conftest.py).
EMULATOR_BUILDS = [("prefill_emu.cc", "-DCACHEFLOW_PREFILL_EMULATE")]


@pytest.fixture(scope="module")
def emu() -> Any:
    lib_path = emulator_builds.library(EMULATOR_BUILDS[0])
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.cf_emu_paged_prefill
    fn.restype = ctypes.c_int
    fn.argtypes = (
        [ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 8
        + [ctypes.c_double, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
        + [ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_int64]
    )
    return fn


def run_emulated(emu: Any, case: dict[str, Any], force_simple: bool = False,
                 max_query_len: int = -1, variant: int = 0) -> int:
    """Runs the op on the case's CPU tensors; returns 1 (tensor-core kernel) or 0 (CUDA cores)."""
    out, query, key_cache, value_cache, tables, starts, ctx = call_args(case)
    collectives = ctypes.c_int64(0)
    path = emu(
        DTYPE_CODES[query.dtype], int(force_simple), variant, out.data_ptr(), query.data_ptr(),
        key_cache.data_ptr(), value_cache.data_ptr(), tables.data_ptr(), starts.data_ptr(),
        ctx.data_ptr(), query.shape[0], query.shape[1], query.shape[2], key_cache.shape[2],
        key_cache.shape[0], key_cache.shape[1], tables.shape[0], tables.shape[1], case["scale"],
        max_query_len, case.get("sliding_window") or 0, ctypes.byref(collectives),
        int(key_cache.dtype == torch.float8_e4m3fn), case.get("k_scale", 1.0),
        case.get("v_scale", 1.0), case.get("logits_soft_cap") or 0.0, query.stride(0),
    )
    return path


# (q_lens, ctx_lens, heads, kv_heads, head_size, block_size, dtype): the tensor-core configs
# (BM 128 / BN 64; head size 64: BN 128; head size 256: BM 128 over 8 warps / BN 64 with one K
# buffer), ragged tiles, prefixes,
# GQA/MQA, block sizes.
TC_CASES = [
    ([130, 1, 77], [130, 9, 200], 2, 1, 64, 16, torch.float16),     # ragged, prefix, q_len 1
    ([200], [333], 2, 2, 128, 8, torch.bfloat16),                    # prefix > tile, block 8
    ([70, 129], [70, 300], 2, 2, 80, 32, torch.float16),             # head 80, block 32
    ([65], [65], 1, 1, 96, 16, torch.bfloat16),                      # head 96, one row past a tile
    ([100], [150], 4, 1, 112, 16, torch.float16),                    # head 112, MQA
    ([70, 3], [100, 40], 2, 1, 256, 16, torch.float16),              # head 256 config
    ([64, 33], [64, 96], 2, 1, 256, 8, torch.bfloat16),
    ([129], [129], 1, 1, 128, 5, torch.float16),                     # block size not a power of 2
    ([40, 40], [40, 1000], 1, 1, 64, 32, torch.bfloat16),            # long prefix, many key tiles
]


@pytest.mark.parametrize(("q_lens", "ctx_lens", "heads", "kv_heads", "head_size", "block_size",
                          "dtype"), TC_CASES)
def test_tensor_core_kernel(emu: Any, q_lens: list[int], ctx_lens: list[int], heads: int,
                            kv_heads: int, head_size: int, block_size: int, dtype: Any) -> None:
    case = make_case(q_lens, ctx_lens, num_heads=heads, num_kv_heads=kv_heads,
                     head_size=head_size, block_size=block_size, dtype=dtype,
                     seed=sum(q_lens) + head_size)
    assert run_emulated(emu, case, max_query_len=max(q_lens)) == 1
    check_close(case["out"], reference(case), dtype, f"emulated tensor-core {head_size}")


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "window", "head_size", "dtype"),
    [
        ([200, 70], [200, 400], 37, 64, torch.float16),     # window < tile: both edges masked
        ([300], [300], 100, 128, torch.bfloat16),           # tiles wholly outside skipped
        ([150, 1], [700, 90], 260, 256, torch.float16),     # one K buffer, prefix, a decode row
        ([90], [130], 1, 80, torch.float16),                # W = 1: each row sees itself
        ([20, 9], [50, 9], 6, 40, torch.float16),           # CUDA-core kernel
    ],
)
def test_sliding_window(emu: Any, q_lens: list[int], ctx_lens: list[int], window: int,
                        head_size: int, dtype: Any) -> None:
    case = make_case(q_lens, ctx_lens, num_heads=2, num_kv_heads=1, head_size=head_size,
                     block_size=16, dtype=dtype, seed=window)
    case["sliding_window"] = window
    run_emulated(emu, case, max_query_len=max(q_lens))
    check_close(case["out"], reference(case), dtype, f"window {window}")


@pytest.mark.parametrize(("variant", "head_size"), [(1, 128), (2, 128), (1, 96)])
def test_benchmark_tilings_of_heads_96_128(emu: Any, variant: int, head_size: int) -> None:
    """The alternative tilings of fp16 / head size 96 and 128 (CACHEFLOW_PREFILL_VARIANT m64,
    w8)."""
    case = make_case([150, 20], [200, 90], num_heads=2, num_kv_heads=1, head_size=head_size,
                     block_size=16, dtype=torch.float16, seed=variant)
    assert run_emulated(emu, case, max_query_len=150, variant=variant) == 1
    check_close(case["out"], reference(case), torch.float16, f"variant {variant}")


@pytest.mark.parametrize(("variant", "head_size", "q_lens", "ctx_lens"),
                         [(4, 64, [300, 20], [420, 90]), (5, 256, [150, 3], [260, 40])])
def test_previous_tilings_of_heads_64_256(emu: Any, variant: int, head_size: int,
                                          q_lens: list[int], ctx_lens: list[int]) -> None:
    """CACHEFLOW_PREFILL_VARIANT=bn64 (variant 4: head size 64 with 64-key tiles) and w4
    (variant 5: head size 256 with 64 rows over 4 warps), the tilings before 2026-12-04:
    several key tiles, a prefix past the query and a partial last tile."""
    case = make_case(q_lens, ctx_lens, num_heads=2, num_kv_heads=1, head_size=head_size,
                     block_size=16, dtype=torch.float16, seed=variant)
    assert run_emulated(emu, case, max_query_len=max(q_lens), variant=variant) == 1
    check_close(case["out"], reference(case), torch.float16, f"variant {variant}")


def test_head_256_previous_tiling(emu: Any) -> None:
    """CACHEFLOW_PREFILL_VARIANT=bn32 (variant 3): head size 256 with BN 32 and two K buffers,
    the tiling of sm_86/89 (99 KB per CTA)."""
    case = make_case([70, 3], [130, 40], num_heads=2, num_kv_heads=1, head_size=256,
                     block_size=16, dtype=torch.bfloat16, seed=11)
    assert run_emulated(emu, case, max_query_len=70, variant=3) == 1
    check_close(case["out"], reference(case), torch.bfloat16, "head 256 bn32")


def test_chunked_grid_order(emu: Any, monkeypatch: Any) -> None:
    """CACHEFLOW_PREFILL_GRID=chunked: the emulated 3-SM device orders chunks of (head, seq)
    groups longest first (the default keeps each group's tiles together)."""
    monkeypatch.setenv("CACHEFLOW_PREFILL_GRID", "chunked")
    case = make_case([150, 20, 130], [160, 90, 130], num_heads=2, num_kv_heads=1, head_size=64,
                     block_size=16, dtype=torch.float16, seed=12)
    assert run_emulated(emu, case, max_query_len=150) == 1
    check_close(case["out"], reference(case), torch.float16, "chunked order")


@pytest.mark.parametrize(("threshold", "head_size"), [("8", 128), ("-1", 64), ("0", 256)])
def test_rescale_threshold(emu: Any, monkeypatch: Any, threshold: str, head_size: int) -> None:
    """Scores spread over ~10 log2 units (query x8): with the lazy default (8) some key tiles
    rescale O and others keep the old maximum (P up to 2^8); -1 rescales at every tile (the
    previous kernel), 0 at every growth. Same result as the reference each way."""
    monkeypatch.setenv("CACHEFLOW_PREFILL_RESCALE_THRESHOLD", threshold)
    case = make_case([130, 5], [260, 90], num_heads=1, num_kv_heads=1, head_size=head_size,
                     block_size=16, dtype=torch.float16, seed=head_size + 1)
    case["query"] = (case["query"].float() * 8).to(torch.float16)
    assert run_emulated(emu, case, max_query_len=150) == 1
    check_close(case["out"], reference(case), torch.float16, f"threshold {threshold}")


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "head_size", "dtype", "force_simple"),
    [
        ([9, 4], [20, 4], 40, torch.float16, False),     # head size without a tensor-core kernel
        ([6], [11], 64, torch.float32, False),            # fp32
        ([7, 2], [7, 9], 64, torch.bfloat16, True),       # the CUDA-core kernel for bf16 too
    ],
)
def test_cuda_core_kernel(emu: Any, q_lens: list[int], ctx_lens: list[int], head_size: int,
                          dtype: Any, force_simple: bool) -> None:
    case = make_case(q_lens, ctx_lens, num_heads=2, num_kv_heads=1, head_size=head_size,
                     block_size=4, dtype=dtype, seed=head_size)
    assert run_emulated(emu, case, force_simple=force_simple) == 0
    check_close(case["out"], reference(case), dtype, "emulated CUDA-core")


def test_grid_bound_defaults_to_num_tokens(emu: Any) -> None:
    """max_query_len unknown (-1): the grid covers num_tokens rows; idle tiles exit."""
    case = make_case([5, 140], [5, 141], num_heads=1, head_size=64, dtype=torch.float16, seed=3)
    assert run_emulated(emu, case, max_query_len=-1) == 1
    check_close(case["out"], reference(case), torch.float16, "default grid")


def test_misaligned_pointers_take_cuda_cores(emu: Any) -> None:
    case = make_case([9], [12], num_heads=2, head_size=64, dtype=torch.float16, seed=4)
    buf = torch.empty(case["query"].numel() + 1, dtype=torch.float16)
    view = buf[1:].view(case["query"].shape)
    view.copy_(case["query"])
    case["query"] = view
    assert run_emulated(emu, case) == 0
    check_close(case["out"], reference(case), torch.float16, "misaligned")


def _strided_query(query: Any, extra_cols: int) -> Any:
    """``query``'s values in a view whose token rows are ``extra_cols`` elements wider (the
    query columns of a fused QKV output); the padding holds NaN, which must never be read."""
    tokens, heads, d = query.shape
    buf = torch.full((tokens, heads * d + extra_cols), float("nan"), dtype=query.dtype)
    view = buf[:, : heads * d].view(tokens, heads, d)
    view.copy_(query)
    return view


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "heads", "kv_heads", "head_size", "dtype", "extra_cols", "path"),
    [
        ([130, 1, 77], [130, 9, 200], 4, 2, 64, torch.float16, 2 * 2 * 64, 1),   # fused QKV
        ([200, 65], [333, 65], 2, 1, 128, torch.bfloat16, 2 * 128, 1),           # GQA, prefix
        ([70, 3], [100, 40], 2, 1, 256, torch.float16, 2 * 256, 1),              # head 256
        ([40, 9], [50, 9], 2, 2, 64, torch.float16, 4, 0),       # stride 264 elements: 528 bytes
        ([20, 9], [50, 9], 2, 1, 40, torch.float32, 2 * 40, 0),  # CUDA-core kernel
    ],
)
def test_strided_query_rows(emu: Any, q_lens: list[int], ctx_lens: list[int], heads: int,
                            kv_heads: int, head_size: int, dtype: Any, extra_cols: int,
                            path: int) -> None:
    """A query whose token rows are strided gives the same bits as its contiguous copy (row
    strides off 16 bytes take the CUDA-core kernel)."""
    case = make_case(q_lens, ctx_lens, num_heads=heads, num_kv_heads=kv_heads,
                     head_size=head_size, block_size=16, dtype=dtype, seed=sum(ctx_lens))
    assert run_emulated(emu, case, max_query_len=max(q_lens)) == (1 if dtype != torch.float32
                                                                     else 0)
    contiguous_out = case["out"].clone()
    if path == 0 and dtype != torch.float32:
        assert run_emulated(emu, case, force_simple=True, max_query_len=max(q_lens)) == 0
        contiguous_out = case["out"].clone()
    case["query"] = _strided_query(case["query"], extra_cols)
    assert not case["query"].is_contiguous()
    case["out"].fill_(float("nan"))
    assert run_emulated(emu, case, max_query_len=max(q_lens)) == path
    assert torch.equal(case["out"], contiguous_out)
    check_close(case["out"], reference(case), dtype, "strided query rows")


def test_rows_without_keys_are_zero(emu: Any) -> None:
    """context_lens < q_len (invalid input): rows before position 0 see no key and are zeros."""
    case = make_case([70], [70], num_heads=1, head_size=64, dtype=torch.float16, seed=5)
    case["context_lens"][0] = 60  # positions of rows 0..9 are negative
    assert run_emulated(emu, case) == 1
    out = case["out"].float()
    assert torch.equal(out[:10], torch.zeros_like(out[:10]))
    assert not torch.isnan(out[10:]).any()


def _to_fp8(case: dict[str, Any], k_scale: float, v_scale: float) -> None:
    """Quantizes the case's caches to FP8 E4M3 with the given scales (NaN poison kept)."""
    case["key_cache"] = quantize_fp8(case["key_cache"], k_scale)
    case["value_cache"] = quantize_fp8(case["value_cache"], v_scale)
    case["k_scale"], case["v_scale"] = k_scale, v_scale


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "head_size", "dtype", "force_simple"),
    [
        ([130, 1, 77], [130, 9, 200], 64, torch.float16, False),   # tensor cores
        ([70, 3], [100, 40], 256, torch.bfloat16, False),          # tensor cores, 1 K buffer
        ([100], [150], 112, torch.float16, False),
        ([9, 4], [20, 4], 40, torch.float16, False),               # CUDA cores
        ([6], [11], 64, torch.float32, False),
        ([7, 2], [7, 9], 128, torch.bfloat16, True),
    ],
)
def test_fp8_cache(emu: Any, q_lens: list[int], ctx_lens: list[int], head_size: int,
                   dtype: Any, force_simple: bool) -> None:
    """FP8 E4M3 caches with K/V scales, dequantized on read by both kernels; the reference sees
    the same FP8 values, so the tolerances are the dtype's."""
    case = make_case(q_lens, ctx_lens, num_heads=4, num_kv_heads=2, head_size=head_size,
                     block_size=16, dtype=dtype, seed=head_size + 7)
    _to_fp8(case, 0.03, 0.2)
    tc = run_emulated(emu, case, force_simple=force_simple, max_query_len=max(q_lens))
    assert tc == int(not force_simple and dtype != torch.float32 and head_size in (64, 112, 256))
    check_close(case["out"], reference(case), dtype, f"fp8 head {head_size}")


@pytest.mark.parametrize(("head_size", "dtype", "force_simple"),
                         [(128, torch.float16, False), (256, torch.bfloat16, False),
                          (64, torch.float32, False)])
def test_logits_soft_cap(emu: Any, head_size: int, dtype: Any, force_simple: bool) -> None:
    """cap * tanh(score / cap) with scores well past the cap (the query scaled by 8)."""
    case = make_case([70, 9], [100, 9], num_heads=2, num_kv_heads=1, head_size=head_size,
                     block_size=16, dtype=dtype, seed=head_size)
    case["query"] = (case["query"].float() * 8).to(dtype)
    case["logits_soft_cap"] = 5.0
    run_emulated(emu, case, force_simple=force_simple, max_query_len=70)
    ref = reference(case)
    check_close(case["out"], ref, dtype, f"soft cap head {head_size}")
    uncapped = reference({**case, "logits_soft_cap": None})
    assert float((ref - uncapped).abs().max()) > 0.1


# The Hopper kernel (wgmma, variant 6 = CACHEFLOW_PREFILL_VARIANT=wgmma: the softmax of a tile
# overlapping P V of the one before; 7 = wgmma_serial): 128-row CTAs of two warpgroups, 128-key
# tiles (64 at head size 256), swizzled shared-memory tiles read through wgmma descriptors.
WG_VARIANT = 6
WG_SERIAL_VARIANT = 7
WG_CASES = [
    ([130, 1, 77], [130, 9, 200], 2, 1, 64, 16, torch.float16),     # ragged, prefix, q_len 1
    ([200], [333], 2, 2, 128, 8, torch.bfloat16),                    # prefix > tile, block 8
    ([129, 64], [300, 64], 4, 2, 128, 16, torch.float16),            # GQA, a row past a tile
    ([65], [65], 1, 1, 96, 16, torch.bfloat16),                      # head 96: half a column block
    ([100], [150], 4, 1, 96, 32, torch.float16),                     # MQA
    ([70, 3], [100, 40], 2, 1, 256, 16, torch.float16),              # head 256: 64-key tiles
    ([64, 33], [64, 96], 2, 1, 256, 8, torch.bfloat16),
    ([129], [129], 1, 1, 128, 5, torch.float16),                     # block size not a power of 2
    ([40, 40], [40, 1000], 1, 1, 64, 32, torch.bfloat16),            # long prefix, many key tiles
]


@pytest.mark.parametrize("variant", [WG_VARIANT, WG_SERIAL_VARIANT])
@pytest.mark.parametrize(("q_lens", "ctx_lens", "heads", "kv_heads", "head_size", "block_size",
                          "dtype"), WG_CASES)
def test_hopper_kernel(emu: Any, q_lens: list[int], ctx_lens: list[int], heads: int,
                       kv_heads: int, head_size: int, block_size: int, dtype: Any,
                       variant: int) -> None:
    case = make_case(q_lens, ctx_lens, num_heads=heads, num_kv_heads=kv_heads,
                     head_size=head_size, block_size=block_size, dtype=dtype,
                     seed=sum(q_lens) + head_size + 1)
    assert run_emulated(emu, case, max_query_len=max(q_lens), variant=variant) == 2
    check_close(case["out"], reference(case), dtype,
                f"emulated Hopper kernel {head_size} variant {variant}")


def test_hopper_kernel_matches_mma_sync_kernel(emu: Any) -> None:
    """The tensor-core kernels on one case agree closely (they round P to 16 bits alike), and
    the two Hopper schedules exactly (the same operations in the same order per row)."""
    case = make_case([150, 20], [400, 90], num_heads=2, num_kv_heads=1, head_size=128,
                     block_size=16, dtype=torch.float16, seed=11)
    outs = {}
    for variant, path in ((WG_VARIANT, 2), (WG_SERIAL_VARIANT, 2), (0, 1)):
        case["out"].fill_(float("nan"))
        assert run_emulated(emu, case, max_query_len=150, variant=variant) == path
        outs[variant] = case["out"].clone()
    assert torch.equal(outs[WG_VARIANT], outs[WG_SERIAL_VARIANT])
    assert float((outs[WG_VARIANT].float() - outs[0].float()).abs().max()) < 2e-3


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "window", "head_size", "dtype"),
    [
        ([200, 70], [200, 400], 37, 64, torch.float16),     # window < tile: both edges masked
        ([300], [300], 130, 128, torch.bfloat16),           # tiles wholly outside skipped
        ([150, 1], [700, 90], 260, 256, torch.float16),     # prefix, a decode row
    ],
)
def test_hopper_kernel_sliding_window(emu: Any, q_lens: list[int], ctx_lens: list[int],
                                      window: int, head_size: int, dtype: Any) -> None:
    case = make_case(q_lens, ctx_lens, num_heads=2, num_kv_heads=1, head_size=head_size,
                     block_size=16, dtype=dtype, seed=window + 1)
    case["sliding_window"] = window
    assert run_emulated(emu, case, max_query_len=max(q_lens), variant=WG_VARIANT) == 2
    check_close(case["out"], reference(case), dtype, f"Hopper kernel, window {window}")


@pytest.mark.parametrize(("head_size", "dtype"), [(64, torch.float16), (256, torch.bfloat16),
                                                  (96, torch.float16)])
def test_hopper_kernel_fp8_cache(emu: Any, head_size: int, dtype: Any) -> None:
    case = make_case([130, 1, 77], [130, 9, 200], num_heads=4, num_kv_heads=2,
                     head_size=head_size, block_size=16, dtype=dtype, seed=head_size + 8)
    _to_fp8(case, 0.03, 0.2)
    assert run_emulated(emu, case, max_query_len=130, variant=WG_VARIANT) == 2
    check_close(case["out"], reference(case), dtype, f"Hopper kernel, fp8 head {head_size}")


def test_hopper_kernel_soft_cap_and_strided_query(emu: Any) -> None:
    case = make_case([70, 9], [100, 9], num_heads=2, num_kv_heads=1, head_size=128,
                     block_size=16, dtype=torch.bfloat16, seed=3)
    case["query"] = _strided_query((case["query"].float() * 8).to(torch.bfloat16), 24)
    case["logits_soft_cap"] = 5.0
    assert run_emulated(emu, case, max_query_len=70, variant=WG_VARIANT) == 2
    check_close(case["out"], reference(case), torch.bfloat16, "Hopper kernel, soft cap")


def test_hopper_kernel_rows_without_keys_are_zero(emu: Any) -> None:
    case = make_case([70], [70], num_heads=1, head_size=64, dtype=torch.float16, seed=5)
    case["context_lens"][0] = 60  # positions of rows 0..9 are negative
    assert run_emulated(emu, case, variant=WG_VARIANT) == 2
    out = case["out"].float()
    assert torch.equal(out[:10], torch.zeros_like(out[:10]))
    assert not torch.isnan(out[10:]).any()
