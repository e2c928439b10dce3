#!/usr/bin/env bash
# One device run after the wave's merges: GPU tests of the new paths (engine, dense and MoE
# models, FP8 KV cache, grouped expert kernel), the MoE benchmark and the chunked-prefill
# serving benchmark. Run there with carry [".whl"]: bash tools/gpu_merge_check.sh
set -uo pipefail
out="${OUT:-/tmp/gpu_merge}"; mkdir -p "$out"
site=$(mktemp -d /tmp/site.XXXX)  # fresh: pip --target does not replace what a warm machine has
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
  .whl/*.whl || exit 1
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
date -u | tee -a "$out/card.txt"
timeout 200 python3 -m pytest -p no:cacheprovider -m "gpu and not slow" -q -rfE -o addopts="" \
  packages/cacheflow-kernels/tests/test_kernels_moe_gpu.py \
  packages/cacheflow-runtime/tests/test_fused_moe_gpu.py \
  packages/cacheflow-runtime/tests/test_fp8_kv_cache.py \
  packages/cacheflow-models/tests/test_gpu_engine.py \
  packages/cacheflow-models/tests/test_gpu_dense_architectures.py \
  packages/cacheflow-models/tests/test_moe_gpu.py \
  packages/cacheflow-serve/tests/test_preemption_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -15
(cd packages/cacheflow-kernels/benchmarks && timeout 90 python3 bench_moe.py \
  --out "$out/bench_moe.json" 2>&1 | tee "$out/bench_moe.log" | tail -12)
NUM_PROMPTS=200 RATE=6 OUT="$out" bash tools/gpu_core_bench.sh serve-only 2>&1 | tail -30
