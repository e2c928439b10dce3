#!/usr/bin/env bash
# One device run: GPU tests of every package and the kernel benchmarks, logs under $OUT.
#
# Prepare here (CPU machine), then run on the device with carry [".whl"]:
#   tools/build_wheels.sh                      # kernel wheel (sm_90) + pure-Python wheels in .whl/
#   bash tools/gpu_check.sh [tests|sanitize|bench|all]  # on the device
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/card.txt"

if [[ "$what" == tests || "$what" == all ]]; then
  # Every gpu-marked test of the four packages. The device image lacks a few CPU-only test
  # dependencies (schemathesis, openai): the modules that import them are reported as collection
  # errors and the run goes on.
  timeout 420 python3 -m pytest -p no:cacheprovider -m "gpu and not slow" -q -rfE --maxfail=30 \
    --continue-on-collection-errors packages/cacheflow-kernels/tests \
    packages/cacheflow-runtime/tests packages/cacheflow-models/tests packages/cacheflow-serve/tests \
    -o addopts="" 2>&1 | tee "$out/gpu_tests.log" | tail -25
fi
if [[ "$what" == sanitize || "$what" == all ]]; then
  # compute-sanitizer over the kernel sweep: memcheck on every op, racecheck and synccheck on
  # the kernels that share memory between threads behind barriers.
  sweep=packages/cacheflow-kernels/tests/sanitizer_sweep.py
  cs="compute-sanitizer --error-exitcode 99"
  timeout 240 $cs --tool memcheck --leak-check no python3 "$sweep" \
    > "$out/memcheck.log" 2>&1; echo "memcheck exit $?" | tee -a "$out/memcheck.log"
  timeout 150 $cs --tool racecheck python3 "$sweep" --only paged_attention,paged_prefill,norm,rotary,rotary_cache,skinny \
    > "$out/racecheck.log" 2>&1; echo "racecheck exit $?" | tee -a "$out/racecheck.log"
  timeout 100 $cs --tool synccheck python3 "$sweep" --only paged_attention,paged_prefill,norm,rotary,rotary_cache,skinny \
    > "$out/synccheck.log" 2>&1; echo "synccheck exit $?" | tee -a "$out/synccheck.log"
  grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|checked in\|match their" "$out"/*check.log
fi
if [[ "$what" == bench || "$what" == all ]]; then
  cd packages/cacheflow-kernels/benchmarks || exit 1
  timeout 150 python3 bench_paged_attention.py --out "$out/bench_paged_attention.json" 2>&1 \
    | tee "$out/bench_paged_attention.log" | tail -20
  timeout 90 python3 bench_paged_prefill.py --out "$out/bench_paged_prefill.json" 2>&1 \
    | tee "$out/bench_paged_prefill.log" | tail -20
  timeout 80 python3 bench_elementwise.py --out "$out/bench_elementwise.json" 2>&1 \
    | tee "$out/bench_elementwise.log" | tail -20
fi
