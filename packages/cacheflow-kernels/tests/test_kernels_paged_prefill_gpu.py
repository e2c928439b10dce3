"""paged_prefill_attention on a CUDA device against the runtime's reference backend (skipped
without CUDA).

Every case draws fresh random inputs (seeded per case), shuffles the block tables, leaves NaN in
every cache slot no sequence owns and NaN in ``out`` before the call, so an unwritten output, a
read past a context or through the wrong block shows up as NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prefill_testutil import ARG_ORDER, call_args, check_close, make_case, reference

import cacheflow_kernels

torch = pytest.importorskip("torch")
pytest.importorskip("cacheflow_runtime")

pytestmark = pytest.mark.gpu

HEAD_SIZES = [64, 80, 96, 112, 128, 256]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _exact_fp32_reference() -> Iterator[None]:
    """The reference's float32 einsums must not run in TF32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def run(case: dict[str, Any], max_query_len: Any = "exact") -> Any:
    if max_query_len == "exact":
        max_query_len = max(case["q_lens"], default=0)
    cacheflow_kernels.paged_prefill_attention(*call_args(case), case["scale"], max_query_len,
                                              sliding_window=case.get("sliding_window"))
    torch.cuda.synchronize()
    return case["out"]


def run_and_check(case: dict[str, Any], dtype: Any, what: str, **kwargs: Any) -> None:
    ref = reference(case)
    out = run(case, **kwargs)
    check_close(out, ref, dtype, what)


def gpu_case(q_lens: list[int], ctx_lens: list[int] | None = None, **kwargs: Any) -> dict[str, Any]:
    return make_case(q_lens, ctx_lens, device="cuda", **kwargs)


# A ragged batch: a decode-like row, rows past one tile, a prefix-cached sequence and a chunk
# whose context is much longer than its query; none a multiple of a tile or a block.
RAGGED_Q = [1, 17, 129, 300, 77]
RAGGED_CTX = [1, 40, 129, 700, 1100]


def test_cuda_available() -> None:
    assert cacheflow_kernels.cuda_available() is True


@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_sizes_and_dtypes(dtype: Any, head_size: int) -> None:
    case = gpu_case(RAGGED_Q, RAGGED_CTX, num_heads=4, num_kv_heads=2, head_size=head_size,
                    block_size=16, dtype=dtype, seed=head_size)
    run_and_check(case, dtype, f"{dtype} head {head_size}")


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(8, 8), (8, 2), (8, 1), (12, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sizes_and_gqa(dtype: Any, num_heads: int, num_kv_heads: int,
                             block_size: int) -> None:
    case = gpu_case([250, 63, 190], [250, 500, 600], num_heads=num_heads,
                    num_kv_heads=num_kv_heads, head_size=128, block_size=block_size, dtype=dtype,
                    seed=block_size * 100 + num_kv_heads)
    run_and_check(case, dtype, f"block {block_size} heads {num_heads}/{num_kv_heads}")


@pytest.mark.parametrize(("dtype", "head_size"), [(torch.float16, 128), (torch.bfloat16, 64),
                                                  (torch.float16, 256), (torch.float32, 128)])
def test_long_ragged_batch(dtype: Any, head_size: int) -> None:
    """Query lengths from 1 to 2000, with and without cached prefixes."""
    q_lens = [2000, 1, 1023, 64, 129, 777, 2]
    ctx_lens = [2000, 1500, 1023, 1088, 129, 1800, 2]
    case = gpu_case(q_lens, ctx_lens, num_heads=4, num_kv_heads=2, head_size=head_size,
                    block_size=16, dtype=dtype, seed=7 + head_size)
    run_and_check(case, dtype, "long ragged")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefix_cached_and_chunked(dtype: Any) -> None:
    """Prefix reuse (1024 cached + 1024 new) and prefill chunks deep into long contexts."""
    case = gpu_case([1024, 256, 37, 512], [2048, 4096, 3000, 512], num_heads=8,
                    num_kv_heads=8, head_size=128, block_size=16, dtype=dtype, seed=11)
    run_and_check(case, dtype, "prefix/chunked")


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_rows(dtype: Any) -> None:
    """q_len 1 for every sequence (the decode case through the prefill kernel)."""
    case = gpu_case([1] * 9, [1, 2, 15, 16, 17, 64, 65, 500, 1031], num_heads=8, num_kv_heads=2,
                    head_size=128, block_size=16, dtype=dtype, seed=13)
    run_and_check(case, dtype, "decode rows")


@pytest.mark.parametrize(("window", "head_size", "dtype"),
                         [(1, 128, torch.float16), (37, 64, torch.bfloat16),
                          (256, 128, torch.float16), (1000, 256, torch.bfloat16),
                          (100, 128, torch.float32), (4096, 96, torch.float16)])
def test_sliding_window(window: int, head_size: int, dtype: Any) -> None:
    """Mistral-style windows: each query sees its last W positions (W = 1: itself only)."""
    case = gpu_case(RAGGED_Q + [1500], RAGGED_CTX + [2500], num_heads=4, num_kv_heads=2,
                    head_size=head_size, block_size=16, dtype=dtype, seed=window)
    case["sliding_window"] = window
    run_and_check(case, dtype, f"window {window}")


# The choices of 2026-12-03 switched back: CACHEFLOW_PREFILL_RESCALE_THRESHOLD=-1 rescales at every
# key tile, CACHEFLOW_PREFILL_VARIANT=bn32 runs head size 256 with BN 32 and two K buffers,
# CACHEFLOW_PREFILL_GRID=chunked the chunked longest-first CTA order (the default is group-major
# again); m64 / w8 are the benchmark tilings of fp16 head sizes 96 and 128, bn64 the head-size-64
# tiling and w4 the head-size-256 tiling before 2026-12-04 (elsewhere they change nothing).
PREVIOUS_ENVS = [
    {"CACHEFLOW_PREFILL_RESCALE_THRESHOLD": "-1"},
    {"CACHEFLOW_PREFILL_VARIANT": "bn32"},
    {"CACHEFLOW_PREFILL_GRID": "chunked"},
    {"CACHEFLOW_PREFILL_RESCALE_THRESHOLD": "0"},
    {"CACHEFLOW_PREFILL_VARIANT": "m64"},
    {"CACHEFLOW_PREFILL_VARIANT": "w8"},
    {"CACHEFLOW_PREFILL_VARIANT": "bn64"},
    {"CACHEFLOW_PREFILL_VARIANT": "w4"},
]


@pytest.mark.parametrize("env", PREVIOUS_ENVS, ids=lambda e: ",".join(f"{k}={v}"
                                                                       for k, v in e.items()))
@pytest.mark.parametrize(("head_size", "dtype"), [(64, torch.float16), (128, torch.bfloat16),
                                                  (96, torch.float16), (128, torch.float16),
                                                  (256, torch.float16), (256, torch.bfloat16)])
def test_previous_kernel_choices(monkeypatch: Any, env: dict[str, str], head_size: int,
                                 dtype: Any) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    case = gpu_case(RAGGED_Q + [1500], RAGGED_CTX + [2500], num_heads=4, num_kv_heads=2,
                    head_size=head_size, block_size=16, dtype=dtype, seed=head_size + 3)
    run_and_check(case, dtype, f"{env} head {head_size}")


@pytest.mark.parametrize("threshold", ["8", "15", "-1"])
@pytest.mark.parametrize("head_size", [128, 256])
def test_lazy_rescale_with_spread_scores(monkeypatch: Any, threshold: str,
                                         head_size: int) -> None:
    """Scores spread over tens of log2 units (query x8), sharp rows: key tiles that move a row's
    maximum past the threshold rescale, the others keep the old maximum (P up to 2^threshold,
    still exact enough in fp16)."""
    monkeypatch.setenv("CACHEFLOW_PREFILL_RESCALE_THRESHOLD", threshold)
    case = gpu_case([1500, 200], [1500, 900], num_heads=4, num_kv_heads=2, head_size=head_size,
                    block_size=16, dtype=torch.float16, seed=31)
    case["query"] = (case["query"].float() * 8).to(torch.float16)
    run_and_check(case, torch.float16, f"threshold {threshold}")


@pytest.mark.parametrize("head_size", [32, 48, 200])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_sizes_without_tensor_cores(dtype: Any, head_size: int) -> None:
    case = gpu_case([33, 130], [40, 130], num_heads=4, num_kv_heads=1, head_size=head_size,
                    block_size=16, dtype=dtype, seed=head_size)
    run_and_check(case, dtype, f"CUDA-core head {head_size}")


@pytest.mark.parametrize("block_size", [1, 5, 48])
def test_block_size_not_a_power_of_two_or_tiny(block_size: int) -> None:
    case = gpu_case([150, 9], [300, 9], num_heads=2, num_kv_heads=1, head_size=128,
                    block_size=block_size, dtype=torch.float16, seed=block_size)
    run_and_check(case, torch.float16, f"block {block_size}")


def test_misaligned_pointers_fall_back() -> None:
    case = gpu_case([70, 5], [90, 5], num_heads=4, head_size=128, dtype=torch.float16, seed=17)
    buf = torch.empty(case["query"].numel() + 1, dtype=torch.float16, device="cuda")
    view = buf[1:].view(case["query"].shape)
    view.copy_(case["query"])
    case["query"] = view
    run_and_check(case, torch.float16, "misaligned query")


@pytest.mark.parametrize(("dtype", "head_size", "extra_cols"),
                         [(torch.float16, 128, 2 * 128), (torch.bfloat16, 64, 4 * 64),
                          (torch.float16, 256, 2 * 256), (torch.float16, 128, 4),
                          (torch.float32, 128, 2 * 128)])
def test_strided_query_rows(dtype: Any, head_size: int, extra_cols: int) -> None:
    """A query whose token rows are strided (the query columns of a fused QKV output, NaN in
    the other columns) gives the same bits as its contiguous copy; a row stride off 16 bytes
    (extra_cols=4 at fp16: 264 bytes past each row) takes the CUDA-core kernel and stays right."""
    case = gpu_case(RAGGED_Q, RAGGED_CTX, num_heads=4, num_kv_heads=2, head_size=head_size,
                    dtype=dtype, seed=23 + extra_cols)
    ref = reference(case)
    dense_out = run(case).clone()
    tokens = case["query"].shape[0]
    wide = torch.full((tokens, 4 * head_size + extra_cols), float("nan"), dtype=dtype,
                      device="cuda")
    view = wide[:, : 4 * head_size].view(tokens, 4, head_size)
    view.copy_(case["query"])
    case["query"] = view
    case["out"].fill_(float("nan"))
    out = run(case)
    if (4 * head_size + extra_cols) * view.element_size() % 16 == 0:
        assert torch.equal(out, dense_out)
    check_close(out, ref, dtype, f"strided query rows (+{extra_cols} columns)")


@pytest.mark.parametrize("bound", [None, "exact", 4096])
def test_max_query_len_bound(bound: Any) -> None:
    """None (num_tokens), the exact maximum, and a loose bound all give the same result."""
    case = gpu_case([300, 20, 129], [350, 20, 129], num_heads=2, head_size=64,
                    dtype=torch.bfloat16, seed=19)
    run_and_check(case, torch.bfloat16, f"bound {bound}", max_query_len=bound)


def test_deterministic() -> None:
    case = gpu_case([500, 77], [900, 77], num_heads=4, num_kv_heads=2, head_size=128,
                    dtype=torch.float16, seed=23)
    first = run(case).clone()
    case["out"].fill_(float("nan"))
    assert torch.equal(run(case), first)


def test_tokens_past_the_last_sequence_are_untouched() -> None:
    case = gpu_case([40, 30], [40, 60], num_heads=2, head_size=64, dtype=torch.float16, seed=29)
    extra = 5
    for name in ("query", "out"):
        pad = torch.full((extra,) + tuple(case[name].shape[1:]), float("nan"),
                         dtype=case[name].dtype, device="cuda")
        case[name] = torch.cat([case[name], pad])
    ref = reference({**case, "query": case["query"][:-extra]})
    out = run(case)
    assert torch.isnan(out[-extra:]).all()
    check_close(out[:-extra], ref, torch.float16, "padded batch")


def test_empty_batches() -> None:
    case = gpu_case([], [], num_heads=2, head_size=64, dtype=torch.float16)
    run(case, max_query_len=None)  # num_seqs == 0, num_tokens == 0: nothing to launch
    case = gpu_case([0, 0], [4, 0], num_heads=2, head_size=64, dtype=torch.float16)
    run(case, max_query_len=None)  # sequences without new tokens
    case = gpu_case([0, 50, 0], [10, 60, 0], num_heads=2, head_size=64, dtype=torch.float16)
    run_and_check(case, torch.float16, "zero-length queries among others")


def test_runs_on_torch_current_stream() -> None:
    """The query is rewritten on a busy side stream just before the call: a kernel launched on
    any other stream would read the old query."""
    case = gpu_case([300, 40], [600, 40], num_heads=8, num_kv_heads=2, head_size=128,
                    dtype=torch.float16, seed=31)
    new_query = torch.randn_like(case["query"])
    ref = reference({**case, "query": new_query})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        case["query"].copy_(new_query)
        cacheflow_kernels.paged_prefill_attention(*call_args(case), case["scale"], 300)
    torch.cuda.synchronize()
    check_close(case["out"], ref, torch.float16, "side stream")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_graph_capture_and_replay(dtype: Any) -> None:
    """Captured once, replayed with new values *and* new metadata of the same shapes: other
    query splits, context lengths and block tables."""
    shapes = {"num_heads": 4, "num_kv_heads": 2, "head_size": 128, "block_size": 16,
              "dtype": dtype, "device": "cuda", "num_blocks": 64, "max_blocks_per_seq": 40}
    bound = 256
    static = make_case([100, 156], [300, 156], seed=37, **shapes)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (loads the library, sets kernel attributes)
        cacheflow_kernels.paged_prefill_attention(*call_args(static), static["scale"], bound)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cacheflow_kernels.paged_prefill_attention(*call_args(static), static["scale"], bound)
    for seed, q_lens, ctx_lens in [(41, [250, 6], [250, 600]), (43, [1, 255], [512, 300])]:
        fresh = make_case(q_lens, ctx_lens, seed=seed, **shapes)
        for name in ARG_ORDER:
            static[name].copy_(fresh[name])
        graph.replay()
        torch.cuda.synchronize()
        check_close(static["out"], reference(fresh), dtype, f"graph replay {q_lens}")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_second_device_while_first_is_current() -> None:
    case = make_case([90, 3], [200, 3], num_heads=2, head_size=128, dtype=torch.float16,
                     device="cuda:1", seed=47)
    ref = reference(case)
    torch.cuda.set_device(0)
    cacheflow_kernels.paged_prefill_attention(*call_args(case), case["scale"], 90)
    torch.cuda.synchronize(1)
    check_close(case["out"], ref, torch.float16, "second device")


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _kernels_launched(case: dict[str, Any]) -> list[str]:
    """Names of the CUDA kernels one call of the op launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(case)
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


# The Hopper kernel (CACHEFLOW_PREFILL_VARIANT=wgmma, or wgmma_serial without the softmax / P V
# overlap; compute capability 9.0 only): ragged
# batches with prefixes and decode rows, GQA / MQA, blocks of 8, 16 and 5 slots, every head size
# it has, both 16-bit types.
HOPPER_CASES = [
    (RAGGED_Q + [1500], RAGGED_CTX + [2500], 4, 2, 64, 16, torch.float16),
    (RAGGED_Q + [1500], RAGGED_CTX + [2500], 4, 2, 128, 16, torch.bfloat16),
    ([2048, 2048], [2048, 4096], 8, 1, 128, 16, torch.float16),
    ([300, 77, 1], [700, 1100, 9], 4, 4, 96, 8, torch.float16),
    (RAGGED_Q, RAGGED_CTX, 2, 1, 256, 16, torch.bfloat16),
    ([150, 9], [300, 9], 2, 1, 128, 5, torch.float16),
]


@pytest.mark.skipif(not _hopper(), reason="the Hopper kernel runs on compute capability 9.0")
@pytest.mark.parametrize("variant", ["wgmma", "wgmma_serial"])
@pytest.mark.parametrize(("q_lens", "ctx_lens", "heads", "kv_heads", "head_size", "block_size",
                          "dtype"), HOPPER_CASES)
def test_hopper_kernel(monkeypatch: Any, q_lens: list[int], ctx_lens: list[int], heads: int,
                       kv_heads: int, head_size: int, block_size: int, dtype: Any,
                       variant: str) -> None:
    monkeypatch.setenv("CACHEFLOW_PREFILL_VARIANT", variant)
    case = gpu_case(q_lens, ctx_lens, num_heads=heads, num_kv_heads=kv_heads,
                    head_size=head_size, block_size=block_size, dtype=dtype,
                    seed=head_size + block_size)
    names = _kernels_launched(case)
    assert any("PagedPrefillWgKernel" in n for n in names), names
    case["out"].fill_(float("nan"))
    run_and_check(case, dtype, f"Hopper kernel head {head_size}")


@pytest.mark.skipif(not _hopper(), reason="the Hopper kernel runs on compute capability 9.0")
@pytest.mark.parametrize(("head_size", "fp8", "variant", "hopper_kernel"),
                         [(128, False, None, True), (96, False, None, True),
                          (256, False, None, True), (64, False, None, True),
                          (128, True, None, False), (64, True, None, False),
                          (128, False, "mma", False), (64, False, "mma", False)])
def test_default_kernel_on_hopper(monkeypatch: Any, head_size: int, fp8: bool, variant: Any,
                                  hopper_kernel: bool) -> None:
    """The default is the Hopper kernel at head sizes 64 / 96 / 128 / 256 with 16-bit caches
    (measured faster there), the mma.sync kernel with FP8 caches; "mma" forces the latter."""
    from paged_attention_testutil import quantize_fp8

    if variant is None:
        monkeypatch.delenv("CACHEFLOW_PREFILL_VARIANT", raising=False)
    else:
        monkeypatch.setenv("CACHEFLOW_PREFILL_VARIANT", variant)
    case = gpu_case([150, 9], [300, 9], num_heads=4, num_kv_heads=2, head_size=head_size,
                    block_size=16, dtype=torch.float16, seed=head_size)
    if fp8:
        case["key_cache"] = quantize_fp8(case["key_cache"], 0.03)
        case["value_cache"] = quantize_fp8(case["value_cache"], 0.2)
        case["k_scale"], case["v_scale"] = 0.03, 0.2
    names = _kernels_launched(case)
    assert any("PagedPrefillWgKernel" in n for n in names) == hopper_kernel, names
    if not fp8:
        case["out"].fill_(float("nan"))
        run_and_check(case, torch.float16, f"default kernel head {head_size}")


@pytest.mark.skipif(not _hopper(), reason="the Hopper kernel runs on compute capability 9.0")
@pytest.mark.parametrize(("q_lens", "ctx_lens", "heads", "kv_heads", "head_size", "block_size",
                          "dtype"), HOPPER_CASES)
def test_mma_kernels_where_the_hopper_kernel_is_default(
        monkeypatch: Any, q_lens: list[int], ctx_lens: list[int], heads: int, kv_heads: int,
        head_size: int, block_size: int, dtype: Any) -> None:
    """The mma.sync kernels keep their coverage on Hopper cards (CACHEFLOW_PREFILL_VARIANT=mma)."""
    monkeypatch.setenv("CACHEFLOW_PREFILL_VARIANT", "mma")
    case = gpu_case(q_lens, ctx_lens, num_heads=heads, num_kv_heads=kv_heads,
                    head_size=head_size, block_size=block_size, dtype=dtype,
                    seed=head_size + block_size)
    names = _kernels_launched(case)
    assert not any("PagedPrefillWgKernel" in n for n in names), names
    case["out"].fill_(float("nan"))
    run_and_check(case, dtype, f"mma kernel head {head_size}")


@pytest.mark.skipif(not _hopper(), reason="the Hopper kernel runs on compute capability 9.0")
@pytest.mark.parametrize(("window", "soft_cap", "head_size", "dtype"),
                         [(37, None, 64, torch.bfloat16), (1000, None, 256, torch.float16),
                          (None, 5.0, 128, torch.float16), (300, 30.0, 96, torch.bfloat16)])
def test_hopper_kernel_window_and_soft_cap(monkeypatch: Any, window: Any, soft_cap: Any,
                                           head_size: int, dtype: Any) -> None:
    monkeypatch.setenv("CACHEFLOW_PREFILL_VARIANT", "wgmma")
    case = gpu_case(RAGGED_Q + [1500], RAGGED_CTX + [2500], num_heads=4, num_kv_heads=2,
                    head_size=head_size, block_size=16, dtype=dtype, seed=head_size + 5)
    case["query"] = (case["query"].float() * 4).to(dtype)
    case["sliding_window"] = window
    case["logits_soft_cap"] = soft_cap
    ref = reference(case)
    cacheflow_kernels.paged_prefill_attention(*call_args(case), case["scale"],
                                              max(case["q_lens"]), sliding_window=window,
                                              logits_soft_cap=soft_cap)
    torch.cuda.synchronize()
    check_close(case["out"], ref, dtype, f"Hopper kernel window {window} cap {soft_cap}")


@pytest.mark.skipif(not _hopper(), reason="the Hopper kernel runs on compute capability 9.0")
@pytest.mark.parametrize(("head_size", "dtype"), [(128, torch.float16), (256, torch.bfloat16),
                                                  (64, torch.bfloat16)])
def test_hopper_kernel_fp8_cache(monkeypatch: Any, head_size: int, dtype: Any) -> None:
    """FP8 E4M3 caches with K/V scales, widened on the way into shared memory."""
    from paged_attention_testutil import quantize_fp8

    monkeypatch.setenv("CACHEFLOW_PREFILL_VARIANT", "wgmma")
    case = gpu_case(RAGGED_Q + [1500], RAGGED_CTX + [2500], num_heads=4, num_kv_heads=2,
                    head_size=head_size, block_size=16, dtype=dtype, seed=head_size + 9)
    case["key_cache"] = quantize_fp8(case["key_cache"], 0.03)
    case["value_cache"] = quantize_fp8(case["value_cache"], 0.2)
    case["k_scale"], case["v_scale"] = 0.03, 0.2
    ref = reference(case)
    cacheflow_kernels.paged_prefill_attention(*call_args(case), case["scale"],
                                              max(case["q_lens"]), k_scale=0.03, v_scale=0.2)
    torch.cuda.synchronize()
    check_close(case["out"], ref, dtype, f"Hopper kernel fp8 head {head_size}")
