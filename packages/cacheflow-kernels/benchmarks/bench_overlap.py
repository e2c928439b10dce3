"""Can decode attention (memory-bound) and a layer's GEMMs (compute-bound) share the GPU?

    python packages/cacheflow-kernels/benchmarks/bench_overlap.py --rows 256 --ctx 673 \
        --out overlap.json

A measurement for issue 10's mixed workload, where decode attention takes 56% of the device
time at the copy rate and the GEMMs 36% at 84% of the matmul rate, one after the other. It
times ``--layers`` LLaMA-7B decoder layers of decode work for ``--rows`` sequences of
``--ctx`` cached tokens (fp16, MHA, head size 128, 16-token blocks), as the engine runs them
today and as two micro-batches of half the rows on two streams (the "two-batch overlap" of
SGLang and DeepSeek: one half's attention runs while the other half's GEMMs do):

- ``gemms`` / ``attention``: the layer's GEMMs (qkv, o, gate_up, down: ``F.linear``) or its
  decode attention alone, at all rows and at half of them;
- ``serial``: both, one after the other on one stream (today's order);
- ``two streams``: each half runs the whole layer chain on a stream of its own, the two
  chains free to interleave.

Every figure is the median of CUDA-graph replays (the streams forked and joined inside the
graph). If ``two streams`` beats ``serial`` clearly, splitting a decode step into two
micro-batches is worth building; if not, the two kinds of kernels do not share SMs well.
Prints a table and writes JSON.

``--prompt-rows P`` measures a mixed step instead (the mixed workload's steps carry about 240
decode rows and 900 prompt tokens): today's order (the GEMMs of all ``--rows`` + P rows, then
the decode rows' attention, per layer) against the decode rows' layer chain and the prompt rows'
GEMMs on two streams, first sharing the whole GPU, then on disjoint SM partitions
(``--green-sms``: SMs of the decode stream's green context, the rest for the prompt stream;
``green_streams.py``). Timed between CUDA events over eager launches (green-context streams
are not captured into graphs here), median of ``--reps``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from bench_decode_gemm import llama_7b_weights, matmul_rate
from bench_timing import copy_bandwidth, environment, time_eager_us, time_graph_us
from green_streams import split_streams

HEADS, HEAD_SIZE, BLOCK = 32, 128, 16


class Layer:
    """One decoder layer's decode work for ``rows`` sequences (weights shared, caches not)."""

    def __init__(self, torch: Any, weights: dict[str, Any], rows: int, ctx: int,
                 first_block: int, caches: tuple[Any, Any]) -> None:
        import cacheflow_kernels as ck

        self.torch, self.weights, self.ck = torch, weights, ck
        hidden = weights["o"].shape[0]
        self.x = torch.randn(rows, hidden, device="cuda", dtype=torch.float16)
        self.query = torch.randn(rows, HEADS, HEAD_SIZE, device="cuda", dtype=torch.float16)
        self.out = torch.empty_like(self.query)
        self.act = torch.empty(rows, weights["down"].shape[1], device="cuda",
                               dtype=torch.float16)
        per_seq = math.ceil(ctx / BLOCK)
        self.tables = (torch.arange(rows * per_seq, device="cuda", dtype=torch.int32)
                       .view(rows, per_seq) + first_block)
        self.lens = torch.full((rows,), ctx, device="cuda", dtype=torch.int32)
        self.key_cache, self.value_cache = caches
        self.ctx = ctx
        size = ck.paged_attention_workspace_size(rows, HEADS, HEADS, HEAD_SIZE, ctx)
        self.workspace = (torch.empty(size, device="cuda", dtype=torch.float32) if size
                          else None)

    def gemms(self) -> None:
        """The layer's four projections and its gated activation."""
        F = self.torch.nn.functional
        w = self.weights
        F.linear(self.x, w["qkv"])
        F.linear(self.x, w["o"])
        self.ck.silu_and_mul(self.act, F.linear(self.x, w["gate_up"]))
        F.linear(self.act, w["down"])

    def attention(self) -> None:
        """Decode attention of every row over its ``ctx`` cached tokens."""
        self.ck.paged_attention(self.out, self.query, self.key_cache, self.value_cache,
                                self.tables, self.lens, HEAD_SIZE ** -0.5,
                                max_context_len=self.ctx, workspace=self.workspace)

    def whole(self) -> None:
        """The layer in the engine's order: qkv, attention, o, gate_up, activation, down."""
        F = self.torch.nn.functional
        w = self.weights
        F.linear(self.x, w["qkv"])
        self.attention()
        F.linear(self.x, w["o"])
        self.ck.silu_and_mul(self.act, F.linear(self.x, w["gate_up"]))
        F.linear(self.act, w["down"])


def two_streams(torch: Any, halves: list[Layer], streams: list[Any], layers: int) -> None:
    """Each half's chain of ``layers`` layers on a stream of its own, joined at the end."""
    main = torch.cuda.current_stream()
    for stream in streams:
        stream.wait_stream(main)
    for half, stream in zip(halves, streams):
        with torch.cuda.stream(stream):
            for _ in range(layers):
                half.whole()
    for stream in streams:
        main.wait_stream(stream)


def on_streams(torch: Any, work: list[tuple[Any, Any]]) -> None:
    """Runs each (stream, fn) pair's fn on its stream, forked from and joined back into the
    current stream."""
    main = torch.cuda.current_stream()
    for stream, _ in work:
        stream.wait_stream(main)
    for stream, fn in work:
        with torch.cuda.stream(stream):
            fn()
    for stream, _ in work:
        main.wait_stream(stream)


def mixed_step(torch: Any, args: Any, weights: dict[str, Any], caches: tuple[Any, Any]
               ) -> dict[str, float]:
    """us per layer of a mixed step's work in today's order, on two streams, and on SM
    partitions (see the module docstring)."""
    n = args.layers
    decode = Layer(torch, weights, args.rows, args.ctx, 0, caches)
    prompt = Layer(torch, weights, args.prompt_rows, args.ctx, 0, caches)
    merged = Layer(torch, weights, args.rows + args.prompt_rows, args.ctx, 0, caches)

    def today() -> None:
        for _ in range(n):
            merged.gemms()
            decode.attention()

    def decode_chain() -> None:
        for _ in range(n):
            decode.whole()

    def prompt_gemms() -> None:
        for _ in range(n):
            prompt.gemms()

    def timed(fn: Any) -> float:
        return time_eager_us(torch, fn, args.reps) / n

    plain = [torch.cuda.Stream(), torch.cuda.Stream()]
    figures = {
        "today: GEMMs of all rows, then decode attention": timed(today),
        "GEMMs of all rows alone": timed(lambda: [merged.gemms() for _ in range(n)]),
        "decode attention alone": timed(lambda: [decode.attention() for _ in range(n)]),
        "decode rows' layer chain alone": timed(decode_chain),
        "prompt rows' GEMMs alone": timed(prompt_gemms),
        "two streams, whole GPU": timed(lambda: on_streams(
            torch, [(plain[0], decode_chain), (plain[1], prompt_gemms)])),
    }
    for sms in [int(v) for v in args.green_sms.split(",") if v]:
        try:
            first, rest, got, left = split_streams(torch, sms, torch.cuda.current_device())
        except (OSError, RuntimeError) as error:
            print(f"green contexts of {sms} SMs: {error}", file=sys.stderr)
            continue
        figures[f"decode chain alone on {got} SMs"] = timed(
            lambda s=first: on_streams(torch, [(s, decode_chain)]))
        figures[f"prompt GEMMs alone on {left} SMs"] = timed(
            lambda s=rest: on_streams(torch, [(s, prompt_gemms)]))
        figures[f"both, {got} | {left} SMs"] = timed(lambda a=first, b=rest: on_streams(
            torch, [(a, decode_chain), (b, prompt_gemms)]))
    return figures


def report_mixed(torch: Any, args: Any, weights: dict[str, Any], caches: tuple[Any, Any],
                 env: dict[str, str], copy_bw: float, mm: float) -> int:
    """Prints (and writes as JSON) the mixed step's figures against today's order."""
    with environment(env):
        figures = mixed_step(torch, args, weights, caches)
    rows = args.rows + args.prompt_rows
    kv_bytes = 2 * args.rows * args.ctx * HEADS * HEAD_SIZE * 2
    flops = 2 * rows * sum(a * b for a, b in llama_7b_weights(lm_head=False).values())
    floors = {"decode attention at the copy rate": kv_bytes / copy_bw * 1e6,
              "GEMMs of all rows at the matmul rate": flops / mm * 1e6}
    floors["the larger of the two (overlapped floor)"] = max(floors.values())
    report(torch, figures, floors, "today: GEMMs of all rows, then decode attention", "today",
           f"{args.rows} decode rows x {args.ctx} tokens + {args.prompt_rows} prompt rows",
           args.out, {"rows": args.rows, "prompt_rows": args.prompt_rows, "ctx": args.ctx,
                      "layers": args.layers, "pdl": args.pdl}, copy_bw, mm)
    return 0


def report(torch: Any, figures: dict[str, float], floors: dict[str, float], reference: str,
           reference_word: str, shape: str, out: str, meta: dict[str, Any], copy_bw: float,
           mm: float) -> None:
    """Prints each figure next to its ratio to ``figures[reference]``; writes JSON to ``out``."""
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s; "
          f"{shape}, us per layer")
    base = figures[reference]
    for name, us in list(figures.items()) + list(floors.items()):
        print(f"  {name:50s} {us:9.1f}  {us / base:6.3f} of {reference_word}")
    if out:
        with open(out, "w") as f:
            json.dump({"card": card, "copy_gbps": copy_bw / 1e9, "matmul_tflops": mm / 1e12,
                       **meta, "us_per_layer": figures, "floors_us": floors}, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256, help="decode sequences (split in two)")
    p.add_argument("--ctx", type=int, default=673, help="cached tokens per sequence")
    p.add_argument("--layers", type=int, default=8, help="layers per timed call")
    p.add_argument("--pdl", default="", help="CACHEFLOW_PDL for the run (default: unset)")
    p.add_argument("--prompt-rows", type=int, default=0,
                   help="time a mixed step with this many prompt rows (see the docstring)")
    p.add_argument("--green-sms", default="48,64,80,96",
                   help="mixed step: SMs of the decode stream's partition, comma-separated")
    p.add_argument("--reps", type=int, default=10, help="mixed step: timed repetitions")
    p.add_argument("--out", default="", help="JSON output path")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    env = {"CACHEFLOW_PDL": args.pdl} if args.pdl else {}
    copy_bw, mm = copy_bandwidth(torch), matmul_rate(torch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen) * 0.02
               for name, (n, k) in llama_7b_weights(lm_head=False).items()}
    per_seq = math.ceil(args.ctx / BLOCK)
    shape = (args.rows * per_seq, BLOCK, HEADS, HEAD_SIZE)
    caches = tuple(torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
                   for _ in range(2))
    if args.prompt_rows > 0:
        return report_mixed(torch, args, weights, caches, env, copy_bw, mm)
    half_rows = args.rows // 2
    full = Layer(torch, weights, args.rows, args.ctx, 0, caches)
    halves = [Layer(torch, weights, half_rows, args.ctx, i * half_rows * per_seq, caches)
              for i in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    n = args.layers

    def timed(fn: Any) -> float:
        return time_graph_us(torch, [fn], calls_per_graph=4, replays=15) / n

    with environment(env):
        figures = {
            "gemms, all rows": timed(lambda: [full.gemms() for _ in range(n)]),
            "gemms, half the rows": timed(lambda: [halves[0].gemms() for _ in range(n)]),
            "attention, all rows": timed(lambda: [full.attention() for _ in range(n)]),
            "attention, half the rows": timed(lambda: [halves[0].attention() for _ in range(n)]),
            "serial, all rows": timed(lambda: [full.whole() for _ in range(n)]),
            "serial, two halves one after the other": timed(
                lambda: [h.whole() for _ in range(n) for h in halves]),
            "two streams, one half each": timed(lambda: two_streams(torch, halves, streams, n)),
        }
    kv_bytes = 2 * args.rows * args.ctx * HEADS * HEAD_SIZE * 2
    flops = 2 * args.rows * sum(a * b for a, b in llama_7b_weights(lm_head=False).values())
    floors = {"attention at the copy rate": kv_bytes / copy_bw * 1e6,
              "gemms at the matmul rate": flops / mm * 1e6}
    report(torch, figures, floors, "serial, all rows", "serial",
           f"{args.rows} rows x {args.ctx} tokens", args.out,
           {"rows": args.rows, "ctx": args.ctx, "layers": n, "pdl": args.pdl}, copy_bw, mm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
