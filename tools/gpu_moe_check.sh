#!/usr/bin/env bash
# One device run for the grouped expert GEMM (issue 15): the kernel's GPU tests (every kernel
# and tile via CACHEFLOW_MOE_GEMM, both dtypes, edge segments), the runtime's fused MoE GPU
# tests, compute-sanitizer memcheck and racecheck on small edge shapes of every tile (when the
# machine has compute-sanitizer), then bench_moe.py (default mma.sync kernel vs the original WMMA
# kernel vs cuBLAS per expert vs the HF loop, plus every forced tile). Logs under $OUT. About
# 2-3 minutes; every step has a timeout (6.5 minutes at worst).
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
  timeout 90 python3 -m pytest -p no:cacheprovider -q -rfE -o addopts="" \
    packages/cacheflow-kernels/tests/test_kernels_moe_gpu.py \
    packages/cacheflow-kernels/tests/test_kernels_moe_arg_checks.py \
    2>&1 | tee "$out/gpu_tests_moe_kernel.log" | grep -E "passed|failed|Error" | tail -12
  timeout 45 python3 -m pytest -p no:cacheprovider -m "gpu and not slow" -q -rfE -o addopts="" \
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
# Every kernel / tile on small edge shapes, checked against torch (exit 1 on a wrong value).
import os, sys
import torch
import cacheflow_kernels as ck
variants = sys.argv[1].split(",")
bad = 0
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
            out = torch.full((m, n), 7.0, dtype=dt, device="cuda")
            ck.moe_grouped_gemm(out, x, w, torch.tensor(offs, device="cuda"))
            ref = torch.full((m, n), 7.0, device="cuda")
            for e in range(len(counts)):
                ref[offs[e]:offs[e + 1]] = x[offs[e]:offs[e + 1]].float() @ w[e].float().t()
            err = (out.float() - ref).abs().max().item()
            if err > 5e-2:
                bad += 1
                print(f"WRONG {v} {counts} n={n} k={k} {dt}: max err {err}")
torch.cuda.synchronize()
print("sanitize sweep:", "FAILED" if bad else "ok", variants)
sys.exit(1 if bad else 0)
PY
    all_variants=auto,wmma,128x256,128x256s3,128x128,64x128,32x128
    timeout 75 "$sanitizer" --tool memcheck --error-exitcode 99 \
      python3 "$out/moe_sanitize.py" "$all_variants" 2>&1 | tee "$out/memcheck.log" | tail -4
    echo "memcheck rc=${PIPESTATUS[0]}" | tee -a "$out/memcheck.log"
    timeout 60 "$sanitizer" --tool racecheck --racecheck-report analysis --error-exitcode 99 \
      python3 "$out/moe_sanitize.py" "128x128,32x128" 2>&1 \
      | tee "$out/racecheck.log" | tail -4
    echo "racecheck rc=${PIPESTATUS[0]}" | tee -a "$out/racecheck.log"
  fi
fi

if [[ "$what" == bench || "$what" == all ]]; then
  (cd packages/cacheflow-kernels/benchmarks && timeout 120 python3 bench_moe.py \
    --tiles 128x256,128x256s3,128x128,64x128,32x128 \
    --out "$out/bench_moe.json" 2>&1 | tee "$out/bench_moe.log" | tail -12)
fi
