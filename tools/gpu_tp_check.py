"""Tensor-parallel checks for a two-GPU machine (issue 12), runnable on a CPU as a dry run.

    python tools/gpu_tp_check.py collectives [--device cuda|cpu] [--out DIR]
    python tools/gpu_tp_check.py engine --model CHECKPOINT [--dtype float16] [--out DIR]

``collectives`` spawns two ranks. Each joins a group through
``cacheflow_runtime.distributed.init_distributed_environment`` (NCCL via ctypes on CUDA, gloo
on CPU) and checks, against sums computed on the CPU in float64 from both ranks' inputs:
all_reduce, all_gather, reduce_scatter and broadcast for float16 / bfloat16 / float32 at sizes
that are not powers of two; then an all-reduce captured in a CUDA graph and replayed with new
inputs (CUDA only); then the bus bandwidth of a 256 MiB all-reduce (float16) through our
communicator next to torch.distributed's own NCCL in the same run (on CPU: 8 MiB over gloo,
figures meaningless). Prints a table, writes collectives.json, exits 1 on any mismatch.

``engine`` generates greedily with ``tensor_parallel_size`` 1 and 2 (mp executor) on the same
prompts and reports top-1 agreement and where the first divergence happens (tp = 2 sums the
row-parallel partials in another order, so fp16 / bf16 may diverge after a near-tie); writes
engine.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

WORLD = 2
DTYPES = ("float16", "bfloat16", "float32")
SIZES = (1, 7, 1023, 4097, (1 << 20) + 3)
BANDWIDTH_BYTES = {"cuda": 256 << 20, "cpu": 8 << 20}


def _inputs(rank: int, n: int, dtype: Any, torch: Any) -> Any:
    gen = torch.Generator().manual_seed(1000 * rank + n)
    return (torch.randn(n, generator=gen, dtype=torch.float64) * 4).to(dtype)


def _check_collectives(rank: int, device: Any, torch: Any) -> list[dict[str, Any]]:
    from cacheflow_runtime import parallel_state as ps

    comm = ps.get_communicator()
    assert comm is not None
    rows = []
    for name in DTYPES:
        dtype = getattr(torch, name)
        for n in SIZES:
            mine = [_inputs(r, n, dtype, torch) for r in range(WORLD)]
            total = (mine[0].double() + mine[1].double()).to(dtype)
            x = mine[rank].to(device)
            got = {
                "all_reduce": comm.all_reduce(x.clone()),
                "all_gather": comm.all_gather(x, 0),
                "broadcast": comm.broadcast(x.clone(), src=1),
            }
            want = {"all_reduce": total, "all_gather": torch.cat(mine),
                    "broadcast": mine[1]}
            if n >= WORLD:
                even = n - n % WORLD
                got["reduce_scatter"] = comm.reduce_scatter(x[:even].clone(), 0)
                half = even // WORLD
                want["reduce_scatter"] = total[rank * half:(rank + 1) * half]
            for op, value in got.items():
                exact = torch.equal(value.cpu(), want[op])
                rows.append(dict(op=op, dtype=name, numel=n, exact=bool(exact)))
    return rows


def _check_graph(rank: int, device: Any, torch: Any) -> dict[str, Any]:
    from cacheflow_runtime import parallel_state as ps

    static = torch.zeros(4099, dtype=torch.float16, device=device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up outside the capture
        out = ps.all_reduce(static.clone()) * 2
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        buf = static * 1
        out = ps.all_reduce(buf) * 2
    results = []
    for trial in range(3):
        mine = [_inputs(r, 4099 + trial, torch.float16, torch)[:4099] for r in range(WORLD)]
        static.copy_(mine[rank].to(device))
        graph.replay()
        torch.cuda.synchronize(device)
        want = ((mine[0].double() + mine[1].double()).to(torch.float16).double() * 2).half()
        results.append(bool(torch.equal(out.cpu(), want)))
    return {"graph_replays_exact": results}


def _bandwidth(rank: int, device: Any, torch: Any) -> dict[str, Any]:
    import torch.distributed as dist

    from cacheflow_runtime import parallel_state as ps

    comm = ps.get_communicator()
    assert comm is not None
    nbytes = BANDWIDTH_BYTES[device.type]
    x = torch.zeros(nbytes // 2, dtype=torch.float16, device=device)
    torch_group = dist.new_group(backend="nccl" if device.type == "cuda" else "gloo")
    iters = 20 if device.type == "cuda" else 3

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / iters

    ours = timed(lambda: comm.all_reduce(x))
    theirs = timed(lambda: dist.all_reduce(x, group=torch_group))
    bus = 2 * (WORLD - 1) / WORLD * nbytes / 1e9
    return {"bytes": nbytes, "ours_ms": ours * 1e3, "torch_ms": theirs * 1e3,
            "ours_busbw_GBps": bus / ours, "torch_busbw_GBps": bus / theirs,
            "ratio_ours_over_torch": theirs / ours}


def _rank_main(rank: int, device_type: str, init_method: str, queue: Any) -> None:
    try:
        import torch

        from cacheflow_runtime.distributed import (
            destroy_distributed_environment,
            init_distributed_environment,
        )

        device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
        comm = init_distributed_environment(WORLD, rank, init_method, device)
        report: dict[str, Any] = {"backend": comm.backend,
                                  "rows": _check_collectives(rank, device, torch)}
        if device_type == "cuda":
            report.update(_check_graph(rank, device, torch))
        report["bandwidth"] = _bandwidth(rank, device, torch)
        destroy_distributed_environment()
        queue.put((rank, "ok", report))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_collectives(device_type: str, out: Path) -> bool:
    """Runs the collective checks on two ranks; True when every result is exact."""
    from cacheflow_runtime.distributed.environment import get_open_port

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{get_open_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, device_type, init, queue))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    reports = {}
    for _ in range(WORLD):
        rank, status, value = queue.get(timeout=600)
        if status != "ok":
            print(f"rank {rank} failed:\n{value}", file=sys.stderr)
            for p in procs:
                p.kill()
            return False
        reports[rank] = value
    for p in procs:
        p.join()
    ok = True
    print(f"collectives over {reports[0]['backend']}")
    print(f"{'op':<15}{'dtype':<10}{'numel':>9}  exact (rank 0, rank 1)")
    for row0, row1 in zip(reports[0]["rows"], reports[1]["rows"]):
        ok &= row0["exact"] and row1["exact"]
        print(f"{row0['op']:<15}{row0['dtype']:<10}{row0['numel']:>9}  "
              f"{row0['exact']}, {row1['exact']}")
    if "graph_replays_exact" in reports[0]:
        graphs = reports[0]["graph_replays_exact"] + reports[1]["graph_replays_exact"]
        ok &= all(graphs)
        print(f"all-reduce in a captured CUDA graph, 3 replays x 2 ranks exact: {graphs}")
    bw = reports[0]["bandwidth"]
    print(f"all-reduce {bw['bytes'] >> 20} MiB float16: ours {bw['ours_ms']:.3f} ms "
          f"({bw['ours_busbw_GBps']:.1f} GB/s bus), torch.distributed {bw['torch_ms']:.3f} ms "
          f"({bw['torch_busbw_GBps']:.1f} GB/s bus), torch/ours time ratio "
          f"{bw['ratio_ours_over_torch']:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "collectives.json").write_text(json.dumps(
        {"device": device_type, "ok": ok, "reports": reports,
         "date": time.strftime("%Y-%m-%d")}, indent=1))
    return ok


def run_engine(model: str, dtype: str, device: str, out: Path, max_tokens: int) -> bool:
    """Greedy generation with tp = 1 and tp = 2 on the same prompts; True when they agree."""
    from cacheflow_runtime import SamplingParams
    from cacheflow_serve.llm import LLM

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "1, 2, 3, 4,", "Tensor parallelism splits"]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    tokens = {}
    timings = {}
    for tp in (1, 2):
        llm = LLM(model, dtype=dtype, device=device, tensor_parallel_size=tp,
                  distributed_executor_backend="mp" if tp > 1 else None)
        llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        timings[tp] = time.perf_counter() - start
        tokens[tp] = [o.outputs[0].token_ids for o in outs]
        llm.engine.shutdown()
    same = total = 0
    first_divergence = []
    for a, b in zip(tokens[1], tokens[2]):
        n = min(len(a), len(b))
        diverge = next((i for i in range(n) if a[i] != b[i]), None)
        first_divergence.append(diverge)
        same += n if diverge is None else diverge
        total += n
    agreement = same / max(total, 1)
    print(f"tp=2 vs tp=1 ({dtype}): prefix agreement {agreement:.3f}, first divergence per "
          f"prompt {first_divergence}, time tp1 {timings[1]:.2f} s, tp2 {timings[2]:.2f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(
        {"model": model, "dtype": dtype, "tokens": tokens, "agreement": agreement,
         "first_divergence": first_divergence, "seconds": timings}, indent=1))
    return agreement == 1.0 or dtype != "float32"


def main() -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    coll = sub.add_parser("collectives")
    coll.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    coll.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_tp_check"))
    eng = sub.add_parser("engine")
    eng.add_argument("--model", required=True)
    eng.add_argument("--dtype", default="float16")
    eng.add_argument("--device", default="auto")
    eng.add_argument("--max-tokens", type=int, default=64)
    eng.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_tp_check"))
    args = parser.parse_args()
    if args.what == "collectives":
        return 0 if run_collectives(args.device, Path(args.out)) else 1
    return 0 if run_engine(args.model, args.dtype, args.device, Path(args.out),
                           args.max_tokens) else 1


if __name__ == "__main__":
    sys.exit(main())
