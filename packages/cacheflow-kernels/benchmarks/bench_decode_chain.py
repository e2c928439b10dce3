"""The decode attention of a step as the engine runs it: each layer's cache write, then attention.

    python packages/cacheflow-kernels/benchmarks/bench_decode_chain.py --out chain.json

In a decode step ``reshape_and_cache`` (the step's token's K/V) runs right before
``paged_attention`` in every layer, both launched with programmatic dependent launch, so the
attention kernel may start while the cache write is still running (csrc/pdl.cuh). This script
captures ``--layers`` such pairs (each layer with its own caches) in a CUDA graph, for a list of
decode shapes, and reports microseconds per layer. It times each shape under the library's
defaults and with the decode kernel's PDL overlap switched off (``CACHEFLOW_PA_EARLY_PREFETCH=0
CACHEFLOW_PA_MAIN_RELEASE=0``: no K/V copies before the wait, the merge kernel released at
exit), in alternating passes, in one process. ``bench_paged_attention.py`` times attention
calls back to back instead, where the kernel before each call is another attention call.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench_timing import cuda_torch, environment, time_graph_us

HEAD_SIZE, BLOCK = 128, 16
# (batch, context, query heads, KV heads): batch-1 latency shapes, engine batches, split cases.
SHAPES = [(1, 256, 32, 32), (1, 2048, 32, 32), (1, 2048, 32, 8), (16, 1024, 32, 32),
          (64, 512, 32, 8), (64, 1024, 32, 32), (256, 700, 32, 32), (1, 16384, 32, 8),
          (8, 8192, 32, 4), (32, 4096, 32, 1)]
VARIANTS = {"default": {}, "off": {"CACHEFLOW_PA_EARLY_PREFETCH": "0",
                                   "CACHEFLOW_PA_MAIN_RELEASE": "0"}}


def make_step(torch: Any, ck: Any, batch: int, ctx: int, heads: int, kv_heads: int,
              layers: int) -> Any:
    """A callable running ``layers`` (cache write, decode attention) pairs for one shape."""
    dev, dt = "cuda", torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    blocks = batch * -(-ctx // BLOCK) + 1

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, device=dev, dtype=dt, generator=g)

    caches = [(rand(blocks, BLOCK, kv_heads, HEAD_SIZE), rand(blocks, BLOCK, kv_heads, HEAD_SIZE))
              for _ in range(layers)]
    perm = torch.randperm(blocks - 1, device=dev, generator=g).to(torch.int32) + 1
    tables = perm.view(batch, -1)
    context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    slots = tables[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK
    query, key, value = rand(batch, heads, HEAD_SIZE), rand(batch, kv_heads, HEAD_SIZE), \
        rand(batch, kv_heads, HEAD_SIZE)
    out = torch.empty_like(query)
    size = ck.paged_attention_workspace_size(batch, heads, kv_heads, HEAD_SIZE, ctx)
    workspace = torch.empty(size, device=dev, dtype=torch.float32) if size else None

    def step() -> None:
        for key_cache, value_cache in caches:
            ck.reshape_and_cache(key, value, key_cache, value_cache, slots)
            ck.paged_attention(out, query, key_cache, value_cache, tables, context_lens,
                               HEAD_SIZE ** -0.5, max_context_len=ctx, workspace=workspace)
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    p.add_argument("--layers", type=int, default=32, help="layers per captured step")
    p.add_argument("--passes", type=int, default=2, help="alternating passes per variant")
    args = p.parse_args(argv)
    torch = cuda_torch()
    if torch is None:
        return 1
    import cacheflow_kernels as ck

    rows = []
    for batch, ctx, heads, kv_heads in SHAPES:
        step = make_step(torch, ck, batch, ctx, heads, kv_heads, args.layers)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.passes):
            for name, env in VARIANTS.items():
                with environment(env):  # the knobs are read when the graph is captured
                    us = time_graph_us(torch, [step], calls_per_graph=1, replays=20)
                times[name].append(us / args.layers)
        rows.append({"shape": f"b{batch} ctx{ctx} h{heads}/kv{kv_heads}", "us_per_layer": times})
        del step
        torch.cuda.empty_cache()
    print(f"{'shape':<26} {'off us':>8} {'default us':>11} {'default/off':>12}")
    for row in rows:
        off, on = min(row["us_per_layer"]["off"]), min(row["us_per_layer"]["default"])
        print(f"{row['shape']:<26} {off:8.2f} {on:11.2f} {on / off:12.3f}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "cacheflow_kernels": ck.__version__, "layers": args.layers,
                   "statistic": "per pass: median of CUDA-graph replays; table: best pass",
                   "results": rows}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
