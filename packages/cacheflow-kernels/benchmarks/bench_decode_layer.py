"""Where a batch-1 decode step's time goes: LLaMA-7B decoder layers built from the kernels alone.

    python packages/cacheflow-kernels/benchmarks/bench_decode_layer.py --out layer.json

Each layer runs the kernels of the engine's batch-1 decode step on compute capability 9.0, in
its order and with its launches (programmatic dependent launch, so a kernel may start while the
one before it ends): ``fused_add_rms_norm``, ``skinny_gemm`` (qkv), ``rotary_embedding_with_cache``,
``paged_attention``, ``skinny_gemm`` (o), ``fused_add_rms_norm``, ``skinny_gemm`` (gate_up),
``skinny_gemm`` (down, SiLU-gated). ``--layers`` layers (weights cycled over ``--weight-sets``
sets, more bytes than L2 holds) are captured in one CUDA graph and replayed.

Parts are then taken out one kind at a time (the GEMMs read whatever buffer the removed kernel
would have written), so the difference to the whole layer is what that part costs in the chain,
overlaps included: ``-norms``, ``-rotary_cache``, ``-attention`` (rotary + cache write and
attention), ``gemms`` (only the four GEMMs). ``fused`` is the whole layer in six kernels: the
norms in the qkv / gate_up GEMMs' prologue (``norm_weight``) and the residual adds in the o / down
GEMMs' epilogue (``residual``, in place on the residual stream). Every variant also runs with
the library's early releases switched off (``pdloff``). The floor is the layer's weight bytes at the
copy bandwidth measured in the same process. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench_timing import copy_bandwidth, cuda_torch, environment, time_graph_us

HIDDEN, HEADS, HEAD_SIZE, MLP = 4096, 32, 128, 11008
BLOCK, EPS = 16, 1e-5
PARTS = ("norms", "rotary_cache", "attention")
FUSED = "fused"  # not a part: the norms and residual adds inside the GEMMs
VARIANTS: dict[str, set[str]] = {
    "layer": set(), FUSED: {FUSED}, "-norms": {"norms"}, "-rotary_cache": {"rotary_cache"},
    "-attention": {"rotary_cache", "attention"}, "gemms": set(PARTS)}
LIBRARY = {"default": {}, "pdloff": {"CACHEFLOW_SKINNY_EARLY_RELEASE": "0",
                                     "CACHEFLOW_PA_EARLY_RELEASE": "0"}}


class Layers:
    """Weights, caches and activations of ``layers`` batch-1 decoder layers."""

    def __init__(self, torch: Any, layers: int, weight_sets: int, ctx: int) -> None:
        dev, dt = "cuda", torch.float16
        g = torch.Generator(device=dev).manual_seed(0)

        def rand(*shape: int, scale: float = 1.0) -> Any:
            return torch.randn(*shape, device=dev, dtype=torch.float32, generator=g).mul_(
                scale).to(dt)

        self.weights = [
            {"qkv": rand(3 * HIDDEN, HIDDEN, scale=HIDDEN ** -0.5),
             "o": rand(HIDDEN, HIDDEN, scale=HIDDEN ** -0.5),
             "gate_up": rand(2 * MLP, HIDDEN, scale=HIDDEN ** -0.5),
             "down": rand(HIDDEN, MLP, scale=MLP ** -0.5),
             "ln1": 1 + rand(HIDDEN, scale=0.1), "ln2": 1 + rand(HIDDEN, scale=0.1)}
            for _ in range(weight_sets)]
        self.weight_bytes = sum(w.numel() * 2 for k, w in self.weights[0].items()
                                if not k.startswith("ln"))
        blocks = -(-ctx // BLOCK)
        self.caches = [(rand(blocks + 1, BLOCK, HEADS, HEAD_SIZE),
                        rand(blocks + 1, BLOCK, HEADS, HEAD_SIZE)) for _ in range(layers)]
        self.table = torch.arange(1, blocks + 1, dtype=torch.int32, device=dev).view(1, -1)
        self.ctx = ctx
        self.context_lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
        self.positions = torch.tensor([ctx - 1], dtype=torch.int64, device=dev)
        self.slots = torch.tensor([ctx - 1 + BLOCK], dtype=torch.int64, device=dev)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD_SIZE, 2, device=dev).float() / HEAD_SIZE))
        angles = torch.arange(4096, device=dev).float()[:, None] * inv[None, :]
        self.cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1).contiguous()
        self.h = rand(1, HIDDEN)
        self.residual = rand(1, HIDDEN)
        self.qkv = torch.empty(1, 3 * HIDDEN, device=dev, dtype=dt)
        self.attn = torch.empty(1, HEADS, HEAD_SIZE, device=dev, dtype=dt)
        self.o = torch.empty(1, HIDDEN, device=dev, dtype=dt)
        self.gate_up = torch.empty(1, 2 * MLP, device=dev, dtype=dt)

    def step(self, ck: Any, drop: set[str]) -> Any:
        """A callable running every layer once without the parts in ``drop`` (or, with FUSED
        in it, with the norms and residual adds inside the GEMMs)."""
        fused = FUSED in drop

        def run() -> None:
            for i, (key_cache, value_cache) in enumerate(self.caches):
                w = self.weights[i % len(self.weights)]
                if fused:
                    ck.skinny_gemm(self.qkv, self.residual, w["qkv"], norm_weight=w["ln1"],
                                   eps=EPS)
                else:
                    if "norms" not in drop:
                        ck.fused_add_rms_norm(self.h, self.residual, w["ln1"], EPS)
                    ck.skinny_gemm(self.qkv, self.h, w["qkv"])
                q = self.qkv[:, :HIDDEN]
                if "rotary_cache" not in drop:
                    ck.rotary_embedding_with_cache(
                        self.positions, q, self.qkv[:, HIDDEN:2 * HIDDEN],
                        self.qkv[:, 2 * HIDDEN:], self.cos_sin, HEAD_SIZE, True, key_cache,
                        value_cache, self.slots)
                attn = q
                if "attention" not in drop:
                    ck.paged_attention(self.attn, q.view(1, HEADS, HEAD_SIZE), key_cache,
                                       value_cache, self.table, self.context_lens,
                                       HEAD_SIZE ** -0.5, max_context_len=self.ctx)
                    attn = self.attn.view(1, HIDDEN)
                if fused:
                    ck.skinny_gemm(self.residual, attn, w["o"], residual=self.residual)
                    ck.skinny_gemm(self.gate_up, self.residual, w["gate_up"],
                                   norm_weight=w["ln2"], eps=EPS)
                    ck.skinny_gemm(self.residual, self.gate_up, w["down"], activation="silu",
                                   residual=self.residual)
                    continue
                ck.skinny_gemm(self.o, attn, w["o"])
                if "norms" not in drop:
                    ck.fused_add_rms_norm(self.o, self.residual, w["ln2"], EPS)
                ck.skinny_gemm(self.gate_up, self.o, w["gate_up"])
                ck.skinny_gemm(self.h, self.gate_up, w["down"], activation="silu")
        return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    p.add_argument("--layers", type=int, default=32, help="layers per captured step")
    p.add_argument("--weight-sets", type=int, default=4, help="distinct weight sets, cycled")
    p.add_argument("--context", type=int, default=192, help="context length of the sequence")
    p.add_argument("--passes", type=int, default=2, help="alternating passes per variant")
    args = p.parse_args(argv)
    torch = cuda_torch((9, 0))
    if torch is None:
        return 1
    import cacheflow_kernels as ck

    layers = Layers(torch, args.layers, args.weight_sets, args.context)
    bandwidth = copy_bandwidth(torch)
    floor_us = layers.weight_bytes / bandwidth * 1e6
    times: dict[str, dict[str, list[float]]] = {
        lib: {name: [] for name in VARIANTS} for lib in LIBRARY}
    runs = [(lib, name) for _ in range(args.passes) for lib in LIBRARY for name in VARIANTS]
    for i, (lib, name) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {lib} {name}", flush=True)
        with environment(LIBRARY[lib]):  # the knobs are read when the graph is captured
            us = time_graph_us(torch, [layers.step(ck, VARIANTS[name])], calls_per_graph=1,
                               replays=20)
        times[lib][name].append(us / args.layers)
    best = {lib: {name: min(v) for name, v in per.items()} for lib, per in times.items()}
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s; a layer's weights "
          f"{layers.weight_bytes / 1e6:.1f} MB, floor {floor_us:.1f} us; context {args.context}")
    print(f"{'variant':<15}" + "".join(f"{lib + ' us':>13}{'/ floor':>9}{'cost':>8}"
                                      for lib in LIBRARY))
    for name in VARIANTS:
        row = f"{name:<15}"
        for lib in LIBRARY:
            us = best[lib][name]
            cost = best[lib]["layer"] - us
            row += f"{us:13.2f}{us / floor_us:9.3f}{cost:8.2f}"
        print(row)
    print("cost = the whole layer's time minus the variant's: what the removed parts add per layer")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "cacheflow_kernels": ck.__version__, "layers": args.layers,
                   "weight_sets": args.weight_sets, "context": args.context,
                   "copy_bytes_per_s": bandwidth, "weight_bytes_per_layer": layers.weight_bytes,
                   "floor_us_per_layer": floor_us,
                   "statistic": "per pass: median of CUDA-graph replays per layer; best: min",
                   "us_per_layer": times, "best_us_per_layer": best}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
