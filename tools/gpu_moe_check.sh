#!/usr/bin/env bash
# One device run for the grouped expert GEMM (issue 15): the kernel's GPU tests (every kernel
# and tile via CACHEFLOW_MOE_GEMM, both dtypes, edge segments; the fused variants: gather /
# scatter / scale, gated activation, the device sort, the top-k sum, CUDA-graph capture), the
# runtime's fused MoE GPU tests (fused vs previous path vs reference, each piece alone and left
# out, via CACHEFLOW_MOE_FUSE), compute-sanitizer memcheck and racecheck on small edge shapes of
# every tile and fused op (when the machine has compute-sanitizer), then bench_moe.py (the HF
# loop vs the previous grouped layer vs the fused layer and its ablations; GEMMs vs cuBLAS per
# expert, plus every forced tile) and a short table of the layer speed-ups. Logs under $OUT.
# About 4-5 minutes; every step has a timeout (7 minutes at worst).
#
# Prepare here: tools/build_wheels.sh (wheels in .whl/); run there with carry [".whl"]:
#   bash tools/gpu_moe_check.sh [tests|sanitizer|bench|all]
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_moe}"
mkdir -p "$out"
site=$(mktemp -d /tmp/site.XXXX)  # fresh: pip --target does not replace older copies
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
unset CACHEFLOW_MOE_GEMM
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, cacheflow_kernels as k; print('torch', torch.__version__, 'kernels', k.__version__, k.cuda_available())" | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"

if [[ "$what" == tests || "$what" == all ]]; then
  timeout 150 python3 -m pytest -p no:cacheprovider -q -rfE -o addopts="" \
    packages/cacheflow-kernels/tests/test_kernels_moe_gpu.py \
    packages/cacheflow-kernels/tests/test_kernels_moe_fused_gpu.py \
    packages/cacheflow-kernels/tests/test_kernels_moe_arg_checks.py \
    2>&1 | tee "$out/gpu_tests_moe_kernel.log" | grep -E "passed|failed|Error" | tail -12
  timeout 90 python3 -m pytest -p no:cacheprovider -m "gpu and not slow" -q -rfE -o addopts="" \
    packages/cacheflow-runtime/tests/test_fused_moe_gpu.py \
    2>&1 | tee "$out/gpu_tests_fused_moe.log" | grep -E "passed|failed|Error" | tail -6
fi

sanitizer=$(command -v compute-sanitizer || true)
if [[ -z "$sanitizer" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then
  sanitizer="$CUDA_HOME/bin/compute-sanitizer"
fi
if [[ -z "$sanitizer" && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  sanitizer=/usr/local/cuda/bin/compute-sanitizer
fi
if [[ "$what" == sanitizer || "$what" == all ]]; then
  if [[ -z "$sanitizer" ]]; then
    echo "compute-sanitizer not found: memcheck/racecheck skipped" | tee "$out/sanitizer.log"
  else
    cat > "$out/moe_sanitize.py" <<'PY'
# Every kernel / tile on small edge shapes, checked against torch (exit 1 on a wrong value): the
# plain GEMM, the indexed GEMM (gather, scatter with skipped rows, scale), the gated GEMM, the
# sort (out-of-range ids) and the top-k sum (scalar and 16-byte paths).
import os, sys
import torch
import cacheflow_kernels as ck
F = torch.nn.functional
variants = sys.argv[1].split(",")
bad = 0
def check(what, got, want, tol=5e-2):
    global bad
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    if not err <= tol:
        bad += 1
        print(f"WRONG {what}: max err {err}")
for v in variants:
    os.environ["CACHEFLOW_MOE_GEMM"] = v
    for counts, n, k in (([0, 1, 17, 65, 129], 264, 520), ([3, 0, 33], 10, 72)):
        for dt in (torch.float16, torch.bfloat16):
            m = sum(counts) + 5
            x = torch.randn(m, k, device="cuda").to(dt)
            w = (torch.randn(len(counts), n, k, device="cuda") / k ** 0.5).to(dt)
            offs = [0]
            for c in counts:
                offs.append(offs[-1] + c)
            offsets = torch.tensor(offs, device="cuda")
            out = torch.full((m, n), 7.0, dtype=dt, device="cuda")
            ck.moe_grouped_gemm(out, x, w, offsets)
            ref = torch.full((m, n), 7.0, device="cuda")
            for e in range(len(counts)):
                ref[offs[e]:offs[e + 1]] = x[offs[e]:offs[e + 1]].float() @ w[e].float().t()
            check(f"plain {v} {counts} n={n} k={k} {dt}", out, ref)
            t = offs[-1]
            x_rows = 11
            xs = x[:x_rows].contiguous()
            row_index = torch.randint(-1, x_rows + 1, (t,), device="cuda").to(torch.int32)
            out_index = torch.randperm(t + 2, device="cuda")[:t].to(torch.int32)
            if t:
                out_index[0] = -1
            scale = torch.rand(t + 2, device="cuda") + 0.5
            out = torch.full((t + 2, n), 7.0, dtype=dt, device="cuda")
            ck.moe_grouped_gemm(out, xs, w, offsets, row_index=row_index, out_index=out_index,
                                out_scale=scale)
            valid = ((row_index >= 0) & (row_index < x_rows)).unsqueeze(1)
            a = torch.where(valid, xs[row_index.clamp(0, x_rows - 1).long()].float(),
                            torch.zeros((), device="cuda"))
            prod = torch.zeros(t, n, device="cuda")
            for e in range(len(counts)):
                prod[offs[e]:offs[e + 1]] = a[offs[e]:offs[e + 1]] @ w[e].float().t()
            ref = torch.full((t + 2, n), 7.0, device="cuda")
            keep = out_index >= 0
            dst = out_index[keep].long()
            ref[dst] = prod[keep] * scale[dst].unsqueeze(1)
            check(f"indexed {v} {counts} n={n} k={k} {dt}", out, ref)
            if n % 2 == 0:
                g = torch.full((t, n // 2), 7.0, dtype=dt, device="cuda")
                ck.moe_grouped_gemm_gated(g, xs, w, offsets, row_index=row_index)
                check(f"gated {v} {counts} n={n} k={k} {dt}", g,
                      F.silu(prod[:, : n // 2]) * prod[:, n // 2:])
ids = torch.randint(-1, 9, (37, 3), device="cuda")
offsets = torch.empty(9, dtype=torch.int64, device="cuda")
pairs = torch.empty(111, dtype=torch.int32, device="cuda")
tokens = torch.empty(111, dtype=torch.int32, device="cuda")
ck.moe_sort_by_expert(offsets, pairs, tokens, ids)
bucket = torch.where((ids >= 0) & (ids < 8), ids, torch.full_like(ids, 8)).reshape(-1)
check("sort", pairs.long(), torch.argsort(bucket, stable=True), 0)
for h in (64, 13):
    xs = torch.randn(37, 3, h, device="cuda").to(torch.bfloat16)
    out = torch.empty(37, h, dtype=torch.bfloat16, device="cuda")
    ck.moe_sum_topk(out, xs, ids, 8)
    valid = ((ids >= 0) & (ids < 8)).unsqueeze(-1)
    check(f"sum h={h}", out, torch.where(valid, xs.float(), torch.zeros((), device="cuda")).sum(1))
torch.cuda.synchronize()
print("sanitize sweep:", "FAILED" if bad else "ok", variants)
sys.exit(1 if bad else 0)
PY
    all_variants=auto,wmma,128x256,128x256s3,128x128,64x128,32x128
    timeout 100 "$sanitizer" --tool memcheck --error-exitcode 99 \
      python3 "$out/moe_sanitize.py" "$all_variants" 2>&1 | tee "$out/memcheck.log" | tail -4
    echo "memcheck rc=${PIPESTATUS[0]}" | tee -a "$out/memcheck.log"
    timeout 60 "$sanitizer" --tool racecheck --racecheck-report analysis --error-exitcode 99 \
      python3 "$out/moe_sanitize.py" "128x128,32x128" 2>&1 \
      | tee "$out/racecheck.log" | tail -4
    echo "racecheck rc=${PIPESTATUS[0]}" | tee -a "$out/racecheck.log"
  fi
fi

if [[ "$what" == bench || "$what" == all ]]; then
  (cd packages/cacheflow-kernels/benchmarks && timeout 200 python3 bench_moe.py \
    --tiles 128x256,128x256s3,128x128,64x128,32x128 \
    --out "$out/bench_moe.json" > "$out/bench_moe.log" 2>&1)
  echo "bench_moe rc=$? (full tables: $out/bench_moe.log)"
  python3 - "$out/bench_moe.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
print(f"MoE layer, bf16, {data['card']} (target: fused >= 3x the loop at 4096 tokens, 8 experts,"
      " top-2, hidden 1024-2048)")
print(f"{'shape (T, E, k, H, I)':<40} {'loop':>7} {'old':>7} {'fused':>7} {'x loop':>7} "
      f"{'x old':>6} {'GEMM TF/s old/fused/cuBLAS':>27}")
for r in data["results"]:
    key = f"{r['shape']} ({r['tokens']},{r['experts']},{r['top_k']},{r['hidden']},{r['intermediate']})"
    if r.get("error"):
        print(f"{key:<40} error: {r['error']}")
        continue
    tf = r.get("gemm_tflops", {})
    gemm = f"{tf.get('mma', 0):.0f}/{tf.get('fused', 0):.0f}/{r.get('cublas_tflops') or 0:.0f}"
    print(f"{key:<40} {r['loop_ms']:>7.3f} {r['grouped_ms']:>7.3f} {r['fused_ms']:>7.3f} "
          f"{r['speedup_fused']:>6.2f}x {r['fused_vs_grouped']:>5.2f}x {gemm:>27}")
    if r.get("ablation_ms"):
        abl = ", ".join(f"{k} {v:.3f}" for k, v in r["ablation_ms"].items())
        print(f"{'':<40} fused with a piece left out (ms): {abl}")
PY
fi
