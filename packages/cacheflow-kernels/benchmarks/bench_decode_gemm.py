"""The GEMMs of one transformer layer at decode batch sizes, through every torch route to cuBLAS.

    python bench_decode_gemm.py --out decode_gemm.json
    python bench_decode_gemm.py --m 256,1153,2048 --transposed   # compute-bound sizes

At batch 1-16 a decode step's projections are matrix-vector products bound by reading the
weights, so each is judged against the copy bandwidth measured in the same process. For each
weight of a LLaMA-shaped layer (qkv, o, gate_up, down) and the LM head, and each M in ``--m``,
it times ``F.linear`` (the runtime's route), ``W @ x.T`` and, at M=1, ``torch.mv``, each with
cuBLAS and cuBLASLt as torch's preferred BLAS library. Calls are CUDA-graph replays
(``bench_timing.time_graph_us``) rotating over copies of the weight that together exceed L2,
so every call reads its weight from HBM. This is the baseline an own small-M GEMV kernel has
to beat; at M <= 2 on compute capability 9.0+ the line also times cacheflow's ``skinny_gemm``
(TMA bulk reads; back-to-back graph replays, so each call's weight read starts under the tail
of the call before, as in the engine's chain of kernels). At larger M the same calls are judged
against the bf16 matmul rate measured in the same process (``of_mm``); ``--transposed`` adds
``x @ Wt`` with the weight stored transposed ([in, out] contiguous), which cuBLAS serves with
other kernels than ``F.linear``'s layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench_timing import copy_bandwidth, time_graph_us

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "vocab": 32000, "qkv": 12288}


def llama_7b_weights(lm_head: bool = True) -> dict[str, tuple[int, int]]:
    """[out, in] of a LLaMA-7B layer's projections (fused qkv and gate_up) and the LM head."""
    h, i, v, qkv = (LLAMA_7B[k] for k in ("hidden", "intermediate", "vocab", "qkv"))
    shapes = {"qkv": (qkv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}
    if lm_head:
        shapes["lm_head"] = (v, h)
    return shapes


def routes(torch: Any, weights: list[Any], x: Any,
           transposed: list[Any] | None) -> dict[str, list[Any]]:
    """Callables per route, each list rotating over the weight copies."""
    import torch.nn.functional as F

    out = {"linear": [lambda w=w: F.linear(x, w) for w in weights],
           "W@xT": [lambda w=w: torch.matmul(w, x.t()) for w in weights]}
    if transposed is not None:
        out["x@Wt"] = [lambda wt=wt: torch.matmul(x, wt) for wt in transposed]
    if x.shape[0] == 1:
        out["mv"] = [lambda w=w: torch.mv(w, x[0]) for w in weights]
    if _skinny_applies(torch, x):
        import cacheflow_kernels as ck

        y = torch.empty(x.shape[0], weights[0].shape[0], dtype=x.dtype, device=x.device)
        out["skinny"] = [lambda w=w: (ck.skinny_gemm(y, x, w), y)[1] for w in weights]
    return out


def _skinny_applies(torch: Any, x: Any) -> bool:
    """Whether cacheflow's skinny_gemm can take these rows here (compute capability 9.0+)."""
    try:
        import cacheflow_kernels as ck
    except ImportError:
        return False
    return (torch.cuda.get_device_capability() >= (9, 0) and ck.cuda_available()
            and x.shape[0] <= ck.SKINNY_GEMM_MAX_ROWS and x.shape[1] % 64 == 0)


def matmul_rate(torch: Any, dim: int = 8192) -> float:
    """FLOP/s of a square bf16 matmul (the engine benchmarks' matmul floor)."""
    a = torch.randn(dim, dim, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(dim, dim, device="cuda", dtype=torch.bfloat16)
    return 2 * dim ** 3 / (time_graph_us(torch, [lambda: a @ b], calls_per_graph=5) * 1e-6)


def main(argv: list[str] | None = None) -> int:
    """Prints one line per weight and M (F.linear and the fastest other route); writes JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,2,4,8,16", help="comma-separated row counts (batch)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--rotate-bytes", type=float, default=400e6,
                   help="bytes of weight copies each weight rotates over (well above L2)")
    p.add_argument("--transposed", action="store_true",
                   help="also time x @ Wt with the weight stored transposed")
    p.add_argument("--out", default="", help="JSON output path")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    copy_bw = copy_bandwidth(torch)
    mm_rate = matmul_rate(torch)
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s, "
          f"{args.dtype}")
    shapes = llama_7b_weights()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (n, k) in shapes.items():
        copies = max(2, int(args.rotate_bytes // (n * k * dtype.itemsize)))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * 0.02
                   for _ in range(copies)]
        transposed = [w.t().contiguous() for w in weights] if args.transposed else None
        for m in (int(s) for s in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            want = torch.nn.functional.linear(x, weights[0]).float()
            results = {}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                for route, calls in routes(torch, weights, x, transposed).items():
                    if route == "skinny" and lib != "cublas":
                        continue  # (no BLAS library under it)
                    got = calls[0]().float().reshape(want.shape[::-1] if route == "W@xT"
                                                      else want.shape)
                    got = got.t() if route == "W@xT" else got
                    err = (got - want).abs().max().item()
                    us = time_graph_us(torch, calls)
                    key = route if route == "skinny" else f"{route}/{lib}"
                    results[key] = {
                        "us": us, "of_copy": n * k * dtype.itemsize / (us * 1e-6) / copy_bw,
                        "of_mm": 2 * m * n * k / (us * 1e-6) / mm_rate, "max_abs_diff": err}
            torch.backends.cuda.preferred_blas_library("cublas")
            base = results["linear/cublas"]
            best_name, best = min(results.items(), key=lambda kv: kv[1]["us"])
            ours = results.get("skinny")
            ours_s = (f" | skinny_gemm {ours['us']:7.1f} us {ours['of_copy']:6.1%} of copy "
                      f"(diff {ours['max_abs_diff']:.1e})" if ours else "")
            print(f"{name:8s} [{n}x{k}] M={m:4d}  F.linear {base['us']:7.1f} us "
                  f"{base['of_copy']:6.1%} of copy {base['of_mm']:6.1%} of mm | fastest "
                  f"{best_name:16s} {best['us']:7.1f} us {best['of_copy']:6.1%} "
                  f"{best['of_mm']:6.1%}{ours_s}", flush=True)
            rows.append({"weight": name, "n": n, "k": k, "m": m, "results": results})
        del weights
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "dtype": args.dtype, "copy_bytes_per_s": copy_bw,
                       "matmul_flops_per_s": mm_rate,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
