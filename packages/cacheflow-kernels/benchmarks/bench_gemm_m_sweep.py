"""A LLaMA-7B layer's four GEMMs (``F.linear``, cuBLAS) at every token count M of a range.

    python bench_gemm_m_sweep.py --m 512:1153:1 --out gemm_m.json

Mixed prefill/decode steps run their GEMMs eagerly at whatever M the scheduler formed. cuBLAS
picks a kernel per shape, and some M are served by slower kernels than a slightly larger M.
For each M this prints the layer's GEMM time next to the time at M rounded up to a multiple
of ``--align`` (what padding the step's rows would cost instead), both CUDA-graph timed.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench_decode_gemm import llama_7b_weights
from bench_timing import time_graph_us


def main(argv: list[str] | None = None) -> int:
    """Prints one line per M; writes JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="512:1153:1", help="START:STOP:STEP (STOP excluded)")
    p.add_argument("--align", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--out", default="", help="JSON output path")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    start, stop, step = (int(x) for x in args.m.split(":"))
    ms = list(range(start, stop, step))
    padded = sorted({-(-m // args.align) * args.align for m in ms})
    shapes = llama_7b_weights(lm_head=False)
    weights = {k: torch.randn(n, kk, device="cuda", dtype=dtype) * 0.02
               for k, (n, kk) in shapes.items()}
    xs = {k: torch.randn(max(ms + padded), kk, device="cuda", dtype=dtype)
          for k, (_, kk) in shapes.items()}
    times: dict[int, float] = {}
    for m in sorted(set(ms) | set(padded)):
        calls = [lambda w=w, x=xs[k][:m]: torch.nn.functional.linear(x, w)
                 for k, w in weights.items()]
        times[m] = sum(time_graph_us(torch, [c], calls_per_graph=10, replays=7) for c in calls)
    rows = []
    slower = 0
    for m in ms:
        mp = -(-m // args.align) * args.align
        ratio = times[m] / times[mp]
        slower += ratio > 1.0
        rows.append({"m": m, "us": times[m], "padded_m": mp, "padded_us": times[mp]})
        print(f"M={m:5d} {times[m]:8.1f} us  padded M={mp:5d} {times[mp]:8.1f} us  "
              f"x{ratio:5.2f}", flush=True)
    gain = sum(min(r["us"], r["padded_us"]) for r in rows) / sum(r["us"] for r in rows)
    print(f"{torch.cuda.get_device_name()}: {slower} of {len(ms)} M slower than padded to "
          f"{args.align}; taking the faster of the two everywhere: x{gain:.3f} of the time")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "align": args.align, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
