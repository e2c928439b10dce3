"""Runs one decode case of bench_paged_attention.py eagerly, for Nsight Compute.

    ncu -k regex:'PagedAttention' --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        python ncu_decode_cases.py mqa_b32_ctx4k
    ncu -k regex:'sdpa|flash|fmha' --launch-skip 2 --launch-count 2 ... (SDPA's kernels)

Six paged_attention calls on the case's inputs (each: the main kernel, and the combine kernel
when the plan splits), then, for 16-bit caches, six calls of torch SDPA on the dense equivalent
(K/V gathered to [batch, kv_heads, ctx, head_size], as the benchmark's baseline).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Runs the case named by ``argv[0]``."""
    import torch
    from bench_paged_attention import CASES, Bench, parse_args

    import cacheflow_kernels as ck

    names = {c.name: c for c in CASES}
    if len(argv) != 1 or argv[0] not in names:
        print(f"usage: ncu_decode_cases.py CASE (one of {', '.join(names)})", file=sys.stderr)
        return 2
    case = names[argv[0]]
    bench = Bench(torch, parse_args(["--out", "/dev/null"]))
    s = bench.build(case, 0, [case.ctx] * case.batch)
    workspace = torch.empty(max(1, ck.paged_attention_workspace_size(
        case.batch, case.num_heads, case.num_kv_heads, case.head_size, case.ctx,
        num_sms=bench.num_sms)), dtype=torch.float32, device="cuda")
    for _ in range(6):
        ck.paged_attention(s["out"], s["query"], s["key_cache"], s["value_cache"],
                           s["block_tables"], s["context_lens"], case.head_size ** -0.5,
                           max_context_len=case.ctx, workspace=workspace)
    torch.cuda.synchronize()
    if not case.fp8:
        pos = torch.arange(case.ctx, device="cuda")
        blk = s["block_tables"].long()[:, pos // case.block_size]
        k = s["key_cache"][blk, pos % case.block_size].permute(0, 2, 1, 3).contiguous()
        v = s["value_cache"][blk, pos % case.block_size].permute(0, 2, 1, 3).contiguous()
        q = s["query"].unsqueeze(2)
        for _ in range(6):
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, enable_gqa=case.num_heads != case.num_kv_heads)
        torch.cuda.synchronize()
    print("done", case.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
