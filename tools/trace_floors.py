"""Floors of a recorded step trace (``cacheflow bench throughput --step-trace PATH``) for a model
shape and a card's rates, without a GPU: a CPU run with the same scheduler settings forms the
same steps as the GPU run, so its trace file says how far below a throughput target the
workload's floors sit on another card (bench_step_trace.py: the overlapped and serial floors).

    python tools/trace_floors.py TRACE --hf-config llama-7b --dtype float16 \
        --bandwidth 4.2e12 --flops 6.6e14 [--bandwidth 4.4e12 --flops 8.0e14 ...]

Each --bandwidth / --flops pair (bytes/s, FLOP/s; e.g. the copy and matmul rates a GPU run
measured) prints one table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cacheflow_serve.bench_step_trace import floors_from_trace, format_trace
from cacheflow_serve.random_checkpoint import build_hf_config, hf_config_fields, parameter_count


def shape_summary(name_or_json: str, dtype: torch.dtype) -> dict:
    """The fields of ``bench_common.model_summary`` that the floors use, from a config alone."""
    config = build_hf_config(hf_config_fields(name_or_json))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    params = parameter_count(config)
    return {"num_layers": config.num_hidden_layers, "num_attention_heads": heads,
            "head_size": head_size, "parameters": params,
            "parameter_bytes": params * dtype.itemsize,
            "kv_bytes_per_token": 2 * config.num_hidden_layers * kv_heads * head_size
            * dtype.itemsize}


def main() -> None:
    """Prints one per-kind table per rate pair."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--hf-config", required=True, help="preset name, config.json or inline JSON")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--bandwidth", type=float, action="append", required=True, help="bytes/s")
    p.add_argument("--flops", type=float, action="append", required=True, help="FLOP/s")
    args = p.parse_args()
    if len(args.bandwidth) != len(args.flops):
        p.error("give --bandwidth and --flops the same number of times (one table per pair)")
    summary = shape_summary(args.hf_config, getattr(torch, args.dtype))
    for bandwidth, flops in zip(args.bandwidth, args.flops):
        print(f"{args.hf_config} {args.dtype}: copy {bandwidth / 1e12:.2f} TB/s, matmul "
              f"{flops / 1e12:.0f} TFLOP/s")
        print(format_trace(floors_from_trace(args.trace, summary, bandwidth, flops), None))


if __name__ == "__main__":
    main()
