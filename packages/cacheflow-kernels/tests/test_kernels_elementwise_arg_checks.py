"""The Python argument checks of the element-wise ops (rms_norm, fused_add_rms_norm,
rotary_embedding, silu_and_mul, gelu_and_mul, gelu_new, gelu_fast, copy_blocks, swap_blocks) on
CPU tensors: no CUDA and no library needed.

Every check must fire before the kernel library is touched: ``get_function`` of each op module is
replaced by a tripwire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from elementwise_testutil import FakeCuda

import cacheflow_kernels as ck
from cacheflow_kernels import _activation_ops, _block_ops, _norm_ops, _rotary_ops

torch = pytest.importorskip("torch")

MODULES = (_norm_ops, _rotary_ops, _activation_ops, _block_ops)


@pytest.fixture(autouse=True)
def _library_tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(name: str) -> Any:
        raise AssertionError(f"library touched ({name}) before arguments were validated")

    for module in MODULES:
        monkeypatch.setattr(module, "get_function", tripwire)


def _gen() -> Any:
    return torch.Generator().manual_seed(0)


# ---- Valid CPU argument sets (valid except for the device), in call order. ----------------------

def norm_args(dtype: Any = torch.float16) -> dict[str, Any]:
    g = _gen()
    x = torch.randn(5, 24, generator=g).to(dtype)
    return {"out": torch.full_like(x, float("nan")), "x": x,
            "weight": torch.randn(24, generator=g).to(dtype), "eps": 1e-6}


def fused_args(dtype: Any = torch.float16) -> dict[str, Any]:
    g = _gen()
    return {"x": torch.randn(5, 24, generator=g).to(dtype),
            "residual": torch.randn(5, 24, generator=g).to(dtype),
            "weight": torch.randn(24, generator=g).to(dtype), "eps": 1e-6}


def rotary_args(dtype: Any = torch.float16) -> dict[str, Any]:
    g = _gen()
    return {"positions": torch.randint(0, 32, (5,), generator=g),
            "query": torch.randn(5, 4 * 16, generator=g).to(dtype),
            "key": torch.randn(5, 2 * 16, generator=g).to(dtype),
            "cos_sin_cache": torch.randn(32, 16, generator=g),
            "head_size": 16, "is_neox": True}


def and_mul_args(dtype: Any = torch.float16) -> dict[str, Any]:
    g = _gen()
    return {"out": torch.full((5, 12), float("nan")).to(dtype),
            "x": torch.randn(5, 24, generator=g).to(dtype)}


def flat_args(dtype: Any = torch.float16) -> dict[str, Any]:
    g = _gen()
    x = torch.randn(3, 7, 5, generator=g).to(dtype)
    return {"out": torch.full_like(x, float("nan")), "x": x}


def copy_blocks_args(dtype: Any = torch.float16, layers: int = 3) -> dict[str, Any]:
    g = _gen()
    shape = (6, 4, 2, 8)
    return {"key_caches": [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)],
            "value_caches": [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)],
            "block_mapping": torch.tensor([[0, 3], [1, 4], [2, 5]], dtype=torch.int64)}


def swap_args(dtype: Any = torch.float16) -> dict[str, Any]:
    g = _gen()
    return {"src": torch.randn(6, 4, 2, 8, generator=g).to(dtype),
            "dst": torch.randn(3, 4, 2, 8, generator=g).to(dtype),
            "block_mapping": torch.tensor([[0, 2], [5, 0]], dtype=torch.int64)}


# op name -> (callable, args factory, the argument whose device is checked first)
OPS: dict[str, tuple[Callable[..., None], Callable[..., dict[str, Any]], str]] = {
    "rms_norm": (ck.rms_norm, norm_args, "x"),
    "fused_add_rms_norm": (ck.fused_add_rms_norm, fused_args, "x"),
    "rotary_embedding": (ck.rotary_embedding, rotary_args, "positions"),
    "silu_and_mul": (ck.silu_and_mul, and_mul_args, "x"),
    "gelu_and_mul": (ck.gelu_and_mul, and_mul_args, "x"),
    "gelu_new": (ck.gelu_new, flat_args, "x"),
    "gelu_fast": (ck.gelu_fast, flat_args, "x"),
    "copy_blocks": (ck.copy_blocks, copy_blocks_args, "block_mapping"),
}
ELEMENTWISE = [op for op in OPS if op != "copy_blocks"]


def _expect(op: str, args: dict[str, Any], arg: str, *fragments: str,
            fn: Callable[..., None] | None = None) -> str:
    fn = fn or OPS[op][0]
    with pytest.raises(ValueError) as info:
        fn(*args.values())
    msg = str(info.value)
    assert msg.startswith(f"{op}: argument '{arg}' must be "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def _tensors(args: dict[str, Any]) -> list[str]:
    return [k for k, v in args.items() if isinstance(v, torch.Tensor)]


def _fake(args: dict[str, Any], index_of: Callable[[str], int] = lambda _: 0,
          keep_cpu: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and k != keep_cpu:
            out[k] = FakeCuda(v, index_of(k))
        elif isinstance(v, list):
            out[k] = [FakeCuda(t) for t in v]
        else:
            out[k] = v
    return out


# ---- Device checks (last). ----------------------------------------------------------------------

@pytest.mark.parametrize("op", list(OPS))
def test_cpu_tensors_need_cuda(op: str) -> None:
    _, make, ref = OPS[op]
    _expect(op, make(), ref, "a CUDA tensor", "got a tensor on cpu")


@pytest.mark.parametrize("op", ELEMENTWISE)
def test_cpu_argument_among_cuda_ones(op: str) -> None:
    _, make, ref = OPS[op]
    for arg in _tensors(make()):
        if arg == ref:
            continue
        args = _fake(make(), keep_cpu=arg)
        _expect(op, args, arg, f"on the same device as '{ref}' (cuda:0)", "got cpu")


@pytest.mark.parametrize("op", ELEMENTWISE)
def test_other_cuda_device(op: str) -> None:
    _, make, ref = OPS[op]
    for arg in _tensors(make()):
        if arg == ref:
            continue
        args = _fake(make(), index_of=lambda k, a=arg: 1 if k == a else 0)
        _expect(op, args, arg, f"on the same device as '{ref}' (cuda:0)", "got cuda:1")


@pytest.mark.parametrize("op", list(OPS))
def test_valid_arguments_reach_the_library(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fn, make, _ = OPS[op]
    calls: list[tuple[Any, ...]] = []
    for module in MODULES:
        monkeypatch.setattr(module, "get_function",
                            lambda name: lambda *a: calls.append((name, *a)))
    args = _fake(make())
    fn(*args.values())
    assert len(calls) == 1 and calls[0][0] == op
    if op == "gelu_and_mul":
        assert calls[0][1:] == (args["out"], args["x"], "none")
    elif op == "copy_blocks":
        assert calls[0][1:] == (args["key_caches"], args["value_caches"], args["block_mapping"])
    else:
        assert list(calls[0][1:]) == list(args.values())


@pytest.mark.parametrize("op", list(OPS))
def test_meta_tensors_need_cuda(op: str) -> None:
    _, make, ref = OPS[op]
    args = {k: (v.to("meta") if isinstance(v, torch.Tensor) else
                [t.to("meta") for t in v] if isinstance(v, list) else v)
            for k, v in make().items()}
    _expect(op, args, ref, "a CUDA tensor", "got a tensor on meta")


# ---- Dtypes. ------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", [op for op in ELEMENTWISE if op != "rotary_embedding"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_valid_dtypes_reach_the_device_check(op: str, dtype: str) -> None:
    _, make, ref = OPS[op]
    _expect(op, make(getattr(torch, dtype)), ref, "a CUDA tensor")


@pytest.mark.parametrize("op", ELEMENTWISE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8])
def test_main_dtype(op: str, dtype: Any) -> None:
    _, make, _ = OPS[op]
    args = make()
    main = "query" if op == "rotary_embedding" else "x"
    args[main] = args[main].to(dtype)
    _expect(op, args, main, "float16, bfloat16 or float32", str(dtype).removeprefix("torch."))


@pytest.mark.parametrize(
    ("op", "arg", "ref"),
    [("rms_norm", "out", "x"), ("rms_norm", "weight", "x"),
     ("fused_add_rms_norm", "residual", "x"), ("fused_add_rms_norm", "weight", "x"),
     ("rotary_embedding", "key", "query"),
     ("silu_and_mul", "out", "x"), ("gelu_and_mul", "out", "x"),
     ("gelu_new", "out", "x"), ("gelu_fast", "out", "x")],
)
def test_dtype_must_match(op: str, arg: str, ref: str) -> None:
    args = OPS[op][1](torch.float16)
    args[arg] = args[arg].to(torch.bfloat16)
    _expect(op, args, arg, f"float16 like '{ref}'", "got bfloat16")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_rotary_positions_dtype(dtype: Any) -> None:
    args = rotary_args()
    args["positions"] = args["positions"].to(dtype)
    _expect("rotary_embedding", args, "positions", "of dtype int64")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rotary_cache_dtype(dtype: Any) -> None:
    args = rotary_args()
    args["cos_sin_cache"] = args["cos_sin_cache"].to(dtype)
    _expect("rotary_embedding", args, "cos_sin_cache", "of dtype float32")


# ---- Shapes. ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("op", "arg", "shape", "fragment"),
    [
        ("rms_norm", "x", (5, 2, 12), "2-D tensor [num_tokens, hidden]"),
        ("rms_norm", "out", (4, 24), "num_tokens=5"),
        ("rms_norm", "out", (5, 23), "hidden=24"),
        ("rms_norm", "weight", (23,), "hidden=24"),
        ("rms_norm", "weight", (1, 24), "1-D tensor [hidden]"),
        ("fused_add_rms_norm", "residual", (5, 25), "hidden=24"),
        ("fused_add_rms_norm", "residual", (6, 24), "num_tokens=5"),
        ("fused_add_rms_norm", "weight", (48,), "hidden=24"),
        ("rotary_embedding", "positions", (5, 1), "1-D tensor [num_tokens]"),
        ("rotary_embedding", "query", (4, 64), "num_tokens=5"),
        ("rotary_embedding", "query", (5, 60), "divisible by head_size=16"),
        ("rotary_embedding", "query", (5, 4, 16), "2-D tensor [num_tokens, num_heads * head_size]"),
        ("rotary_embedding", "key", (5, 20), "divisible by head_size=16"),
        ("rotary_embedding", "key", (6, 32), "num_tokens=5"),
        ("rotary_embedding", "cos_sin_cache", (32, 15), "rot_dim even"),
        ("rotary_embedding", "cos_sin_cache", (32, 18), "<= head_size=16"),
        ("rotary_embedding", "cos_sin_cache", (32, 0), "rot_dim even, >= 2"),
        ("rotary_embedding", "cos_sin_cache", (32 * 16,), "2-D tensor [max_position, rot_dim]"),
        ("silu_and_mul", "x", (5, 23), "an even last dimension"),
        ("silu_and_mul", "out", (5, 24), "[5, 12]"),
        ("silu_and_mul", "out", (5, 1, 12), "[5, 12]"),
        ("gelu_and_mul", "out", (4, 12), "[5, 12]"),
        ("gelu_new", "out", (3, 7, 4), "[3, 7, 5] like 'x'"),
        ("gelu_fast", "out", (105,), "[3, 7, 5] like 'x'"),
    ],
)
def test_shapes(op: str, arg: str, shape: tuple[int, ...], fragment: str) -> None:
    args = OPS[op][1]()
    args[arg] = torch.ones(shape, dtype=args[arg].dtype)
    msg = _expect(op, args, arg, fragment)
    assert "got" in msg


def test_and_mul_scalar_input() -> None:
    args = and_mul_args()
    args["x"] = torch.tensor(1.0, dtype=torch.float16)
    _expect("silu_and_mul", args, "x", "at least 1 dimension", "0-D")


def test_and_mul_three_dims() -> None:
    args = {"out": torch.empty(2, 3, 5), "x": torch.randn(2, 3, 10)}
    _expect("silu_and_mul", args, "x", "a CUDA tensor")
    args["out"] = torch.empty(2, 5, 3)
    _expect("silu_and_mul", args, "out", "of shape [2, 3, 5]", "got [2, 5, 3]")


def test_error_messages_are_complete() -> None:
    args = norm_args()
    args["weight"] = torch.ones(23, dtype=torch.float16)
    with pytest.raises(ValueError) as info:
        ck.rms_norm(*args.values())
    assert str(info.value) == "rms_norm: argument 'weight' must be of shape [hidden=24], got [23]"
    args = and_mul_args()
    args["out"] = torch.ones(5, 24, dtype=torch.float16)
    with pytest.raises(ValueError) as info:
        ck.silu_and_mul(*args.values())
    assert str(info.value) == (
        "silu_and_mul: argument 'out' must be of shape [5, 12] (the shape of 'x' with the last "
        "dimension halved), got [5, 24]"
    )


# ---- Scalars. -----------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm"])
@pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf"), "1e-6", None, True])
def test_eps(op: str, eps: Any) -> None:
    args = OPS[op][1]()
    args["eps"] = eps
    _expect(op, args, "eps", "a finite float >= 0", f"got {eps!r}")


@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm"])
def test_integer_eps_is_accepted(op: str) -> None:
    args = OPS[op][1]()
    args["eps"] = 0
    _expect(op, args, "x", "a CUDA tensor")


@pytest.mark.parametrize("head_size", [0, -16, 16.0, "16", None, True])
def test_rotary_head_size(head_size: Any) -> None:
    args = rotary_args()
    args["head_size"] = head_size
    _expect("rotary_embedding", args, "head_size", "a positive integer")


@pytest.mark.parametrize("is_neox", [1, 0, None, "yes"])
def test_rotary_is_neox(is_neox: Any) -> None:
    args = rotary_args()
    args["is_neox"] = is_neox
    _expect("rotary_embedding", args, "is_neox", "a bool")


@pytest.mark.parametrize("approximate", ["tanh ", "erf", None, ""])
def test_gelu_and_mul_approximate(approximate: Any) -> None:
    args = and_mul_args()
    _expect("gelu_and_mul", args, "approximate", "'none' or 'tanh'",
            fn=lambda out, x: ck.gelu_and_mul(out, x, approximate))


def test_gelu_and_mul_tanh_reaches_the_device_check() -> None:
    args = and_mul_args()
    _expect("gelu_and_mul", args, "x", "a CUDA tensor",
            fn=lambda out, x: ck.gelu_and_mul(out, x, "tanh"))


# ---- Memory layout. -----------------------------------------------------------------------------

def _strided(x: Any) -> Any:
    """Same shape and values, every other element of a twice-as-long buffer."""
    return torch.stack([x, x], dim=-1)[..., 0]


@pytest.mark.parametrize(
    ("op", "arg"),
    [("rms_norm", "out"), ("rms_norm", "x"), ("rms_norm", "weight"),
     ("fused_add_rms_norm", "x"), ("fused_add_rms_norm", "residual"),
     ("fused_add_rms_norm", "weight"),
     ("rotary_embedding", "positions"), ("rotary_embedding", "cos_sin_cache"),
     ("silu_and_mul", "out"), ("silu_and_mul", "x"), ("gelu_and_mul", "x"),
     ("gelu_new", "out"), ("gelu_new", "x"), ("gelu_fast", "x")],
)
def test_non_contiguous(op: str, arg: str) -> None:
    args = OPS[op][1]()
    args[arg] = _strided(args[arg])
    assert not args[arg].is_contiguous()
    _expect(op, args, arg, "contiguous", "strided tensor")


@pytest.mark.parametrize("arg", ["query", "key"])
def test_rotary_last_dimension_must_be_contiguous(arg: str) -> None:
    args = rotary_args()
    args[arg] = _strided(args[arg])
    _expect("rotary_embedding", args, arg, "contiguous in its last dimension (stride 1)",
            "strides [")


def test_rotary_overlapping_rows() -> None:
    args = rotary_args()
    base = torch.randn(64 + 8, dtype=torch.float16)
    args["query"] = base.as_strided((5, 64), (2, 1))
    _expect("rotary_embedding", args, "query", "non-overlapping rows (row stride >= 64)",
            "got row stride 2")


def test_rotary_accepts_slices_of_a_fused_qkv(monkeypatch: pytest.MonkeyPatch) -> None:
    """query/key as column slices of one [num_tokens, q + k + v] tensor reach the library."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(_rotary_ops, "get_function",
                        lambda name: lambda *a: calls.append((name, *a)))
    args = rotary_args()
    qkv = torch.randn(5, 64 + 32 + 32, dtype=torch.float16)
    args["query"], args["key"] = qkv[:, :64], qkv[:, 64:96]
    assert not args["query"].is_contiguous()
    fake = _fake(args)
    ck.rotary_embedding(*fake.values())
    assert len(calls) == 1


# ---- copy_blocks specifics. ---------------------------------------------------------------------

def test_copy_blocks_needs_lists() -> None:
    args = copy_blocks_args()
    args["key_caches"] = torch.stack(args["key_caches"])
    _expect("copy_blocks", args, "key_caches", "a list of tensors (one per layer)", "got Tensor")


def test_copy_blocks_list_lengths() -> None:
    args = copy_blocks_args()
    args["value_caches"] = args["value_caches"][:2]
    _expect("copy_blocks", args, "value_caches", "a list of 3 tensors", "got 2 tensors")


@pytest.mark.parametrize(
    ("lst", "index", "shape", "fragment"),
    [("key_caches", 0, (6, 4, 16), "4-D tensor [num_blocks, block_size, num_kv_heads, head_size]"),
     ("key_caches", 2, (6, 4, 2, 4), "head_size=8"),
     ("value_caches", 1, (7, 4, 2, 8), "num_blocks=6"),
     ("value_caches", 0, (6, 3, 2, 8), "block_size=4")],
)
def test_copy_blocks_layer_shapes(lst: str, index: int, shape: tuple[int, ...],
                                  fragment: str) -> None:
    args = copy_blocks_args()
    args[lst][index] = torch.ones(shape, dtype=torch.float16)
    _expect("copy_blocks", args, f"{lst}[{index}]", fragment)


def test_copy_blocks_layer_dtypes() -> None:
    args = copy_blocks_args()
    args["value_caches"][2] = args["value_caches"][2].float()
    _expect("copy_blocks", args, "value_caches[2]", "float16 like 'key_caches[0]'", "float32")
    args = copy_blocks_args(torch.float64)
    _expect("copy_blocks", args, "key_caches[0]",
            "float16, bfloat16, float32, float8_e4m3fn or uint8")


def test_copy_blocks_layer_contiguity() -> None:
    args = copy_blocks_args()
    args["key_caches"][1] = args["key_caches"][1].transpose(2, 3).contiguous().transpose(2, 3)
    _expect("copy_blocks", args, "key_caches[1]", "contiguous")


@pytest.mark.parametrize(
    ("mapping", "fragment"),
    [(torch.zeros(3, 3, dtype=torch.int64), "[num_pairs, 2=2]"),
     (torch.zeros(6, dtype=torch.int64), "2-D tensor [num_pairs, 2]"),
     (torch.zeros(3, 2, dtype=torch.int32), "of dtype int64")],
)
def test_copy_blocks_mapping(mapping: Any, fragment: str) -> None:
    args = copy_blocks_args()
    args["block_mapping"] = mapping
    _expect("copy_blocks", args, "block_mapping", fragment)


def test_copy_blocks_layer_device() -> None:
    args = _fake(copy_blocks_args())
    args["value_caches"][1] = copy_blocks_args()["value_caches"][1]
    _expect("copy_blocks", args, "value_caches[1]", "on the same device as 'block_mapping'",
            "got cpu")


def test_copy_blocks_no_layers_reaches_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(_block_ops, "get_function",
                        lambda name: lambda *a: calls.append((name, *a)))
    ck.copy_blocks([], [], FakeCuda(torch.zeros(0, 2, dtype=torch.int64)))
    assert calls and calls[0][1:3] == ([], [])


def test_copy_blocks_not_a_tensor() -> None:
    args = copy_blocks_args()
    args["key_caches"][1] = [[0.0]]
    with pytest.raises(TypeError, match="copy_blocks: argument 'key_caches\\[1\\]' must be a "
                                        "tensor"):
        ck.copy_blocks(*args.values())


# ---- swap_blocks specifics. ---------------------------------------------------------------------

def _swap_expect(args: dict[str, Any], arg: str, *fragments: str) -> str:
    return _expect("swap_blocks", args, arg, *fragments, fn=ck.swap_blocks)


def test_swap_blocks_two_cpu_tensors() -> None:
    _swap_expect(swap_args(), "dst", "a CUDA tensor when 'src' is on the CPU",
                 "got a tensor on cpu")


def test_swap_blocks_pageable_host_memory() -> None:
    args = swap_args()
    args["src"] = FakeCuda(args["src"])
    _swap_expect(args, "dst", "pinned (page-locked) host memory", "got pageable host memory")
    args = swap_args()
    args["dst"] = FakeCuda(args["dst"])
    _swap_expect(args, "src", "pinned (page-locked) host memory")


def test_swap_blocks_mapping_on_cpu() -> None:
    args = swap_args()
    args["src"], args["dst"] = FakeCuda(args["src"]), FakeCuda(args["dst"])
    args["block_mapping"] = FakeCuda(args["block_mapping"])
    _swap_expect(args, "block_mapping", "a CPU tensor", "got a tensor on cuda:0")


def test_swap_blocks_two_cuda_devices() -> None:
    args = swap_args()
    args["src"], args["dst"] = FakeCuda(args["src"], 0), FakeCuda(args["dst"], 1)
    _swap_expect(args, "dst", "on the same device as 'src' (cuda:0)", "got cuda:1")


def test_swap_blocks_meta_tensor() -> None:
    args = swap_args()
    args["src"] = args["src"].to("meta")
    _swap_expect(args, "src", "a CUDA or pinned CPU tensor", "got a tensor on meta")


def test_swap_blocks_valid_cuda_to_cuda_reaches_the_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(_block_ops, "get_function",
                        lambda name: lambda *a: calls.append((name, *a)))
    args = swap_args()
    args["src"], args["dst"] = FakeCuda(args["src"]), FakeCuda(args["dst"])
    ck.swap_blocks(*args.values())
    assert len(calls) == 1 and calls[0][0] == "swap_blocks"


@pytest.mark.parametrize(
    ("arg", "value", "fragment"),
    [("dst", torch.zeros(3, 4, 2, 9, dtype=torch.float16), "[num_blocks, d1=4, d2=2, d3=8]"),
     ("dst", torch.zeros(3, 64, dtype=torch.float16), "4-D tensor"),
     ("dst", torch.zeros(3, 4, 2, 8, dtype=torch.float32), "of dtype float16 like 'src'"),
     ("src", torch.tensor(1.0), "at least 1 dimension"),
     ("block_mapping", torch.zeros(2, 3, dtype=torch.int64), "[num_pairs, 2=2]"),
     ("block_mapping", torch.zeros(2, 2, dtype=torch.int32), "of dtype int64")],
)
def test_swap_blocks_shapes(arg: str, value: Any, fragment: str) -> None:
    args = swap_args()
    args[arg] = value
    _swap_expect(args, arg, fragment)


@pytest.mark.parametrize("arg", ["src", "dst", "block_mapping"])
def test_swap_blocks_non_contiguous(arg: str) -> None:
    args = swap_args()
    args[arg] = _strided(args[arg])
    _swap_expect(args, arg, "contiguous")


def test_swap_blocks_any_dtype_reaches_the_device_check() -> None:
    args = swap_args()
    args["src"], args["dst"] = args["src"].to(torch.int8), args["dst"].to(torch.int8)
    _swap_expect(args, "dst", "a CUDA tensor when 'src' is on the CPU")


# ---- No framework import. -----------------------------------------------------------------------

def test_validation_does_not_import_torch_or_tvm_ffi() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cacheflow_kernels as ck\n"
        "class T:\n"
        "    def __init__(self, shape, dtype='float16'):\n"
        "        self.shape, self.dtype = shape, dtype\n"
        "    def __dlpack_device__(self): return (1, 0)\n"
        "    def is_contiguous(self): return True\n"
        "calls = [\n"
        "    lambda: ck.rms_norm(T((3, 8)), T((3, 8)), T((8,)), 1e-6),\n"
        "    lambda: ck.fused_add_rms_norm(T((3, 8)), T((3, 8)), T((8,)), 1e-6),\n"
        "    lambda: ck.rotary_embedding(T((3,), 'int64'), T((3, 16)), T((3, 8)),\n"
        "                                T((9, 8), 'float32'), 8, True),\n"
        "    lambda: ck.silu_and_mul(T((3, 4)), T((3, 8))),\n"
        "    lambda: ck.gelu_and_mul(T((3, 4)), T((3, 8)), 'tanh'),\n"
        "    lambda: ck.gelu_new(T((3, 4)), T((3, 4))),\n"
        "    lambda: ck.gelu_fast(T((3, 4)), T((3, 4))),\n"
        "    lambda: ck.copy_blocks([T((2, 1, 1, 8))], [T((2, 1, 1, 8))], T((1, 2), 'int64')),\n"
        "]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        assert 'CUDA tensor' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('no ValueError')\n"
        "assert 'torch' not in sys.modules and 'tvm_ffi' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
