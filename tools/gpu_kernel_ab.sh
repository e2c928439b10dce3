#!/usr/bin/env bash
# A/B of kernel wheels on the decode benchmark, on the device: "base" = .whl/kbase/ (e.g. the
# default build), "new" = the kernel wheel in .whl/ (e.g. a build option or a change), and one
# more variant per .whl/kvar-NAME/ directory (named NAME), each case timed by
# bench_paged_attention.py in alternating processes (PASSES rounds, default 2; SDPA in the first
# only), then a table of each variant / base per case (min over passes; tools/kernel_ab_table.py).
# With "tests" (and "all", the default), first the decode GPU tests against the new wheel; with
# "sanitize" (and "all"), memcheck and racecheck over the decode sweep with the new wheel. The
# tests and the sweep also run against each extra variant when EXTRA_CHECKS=1.
#
# Prepare here, e.g. for a kernel build option (packages/cacheflow-kernels README, "Knobs":
# CACHEFLOW_PA_LDSM_V, CACHEFLOW_PA_FP8_F16_MMA):
#   PYTHON=.venv/bin/python bash tools/build_wheels.sh && mkdir -p .whl/kbase \
#     && cp .whl/cacheflow_kernels-*.whl .whl/kbase/ \
#     && rm .whl/cacheflow_kernels-*.whl && CACHEFLOW_PA_LDSM_V=1 .venv/bin/python -m pip wheel \
#        -q --no-deps --no-build-isolation packages/cacheflow-kernels -w .whl
# then run there with carry [".whl"]:
#   CASES=mqa_b32_ctx4k,... PASSES=2 bash tools/gpu_kernel_ab.sh [tests|sanitize|bench|all]
# (SDPA is timed in pass 1 only; FIRST_PASS=N numbers a later call's passes from N on.)
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_kernel_ab}"
mkdir -p "$out"
deps=$(ls .whl/*.whl | grep -v -E 'cacheflow_kernels-')
declare -A wheel_dir=([base]=.whl/kbase [new]=.whl)
variants=(base new)
for d in .whl/kvar-*/; do
  [[ -d $d ]] || continue
  name=$(basename "$d"); name=${name#kvar-}
  wheel_dir[$name]=${d%/}; variants+=("$name")
done
for v in "${variants[@]}"; do
  rm -rf "/tmp/ab-site-$v"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "/tmp/ab-site-$v" $deps "${wheel_dir[$v]}"/cacheflow_kernels-*.whl || exit 1
done
checked=(new); [[ "${EXTRA_CHECKS:-0}" == 1 ]] && checked=("${variants[@]:1}")
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
date -u | tee -a "$out/card.txt"
t0=$(date +%s)
if [[ "$what" == tests || "$what" == all ]]; then
  for v in "${checked[@]}"; do
    echo "== decode GPU tests ($v)"
    PYTHONPATH=/tmp/ab-site-$v timeout 300 python3 -m pytest -p no:cacheprovider -q -o addopts="" \
      -m gpu packages/cacheflow-kernels/tests/test_kernels_paged_attention_gpu.py \
      packages/cacheflow-kernels/tests/test_kernels_paged_attention_fused_gpu.py \
      packages/cacheflow-kernels/tests/test_kernels_pdl_chain_gpu.py > "$out/tests_decode_$v.log" 2>&1
    tail -3 "$out/tests_decode_$v.log"
    echo "tests ($v): $(( $(date +%s) - t0 )) s"
  done
fi
if [[ "$what" == sanitize || "$what" == all ]]; then
  sweep=packages/cacheflow-kernels/tests/sanitizer_sweep.py
  for v in "${checked[@]}"; do
    for tool in memcheck racecheck; do
      PYTHONPATH=/tmp/ab-site-$v timeout 240 compute-sanitizer --error-exitcode 99 --tool "$tool" \
        python3 "$sweep" --only paged_attention > "$out/${tool}_$v.log" 2>&1
      echo "$tool ($v): exit $?, $(( $(date +%s) - t0 )) s"
    done
  done
  grep -H "ERROR SUMMARY\|RACECHECK SUMMARY" "$out"/*check_*.log
fi
if [[ "$what" == bench || "$what" == all ]]; then
  cases=(); [[ -n "${CASES:-}" ]] && cases=(--cases "$CASES")
  first=${FIRST_PASS:-1}  # a later call on the same machine goes on with FIRST_PASS=3 etc.
  for pass in $(seq "$first" $(( first + ${PASSES:-2} - 1 ))); do
    for v in "${variants[@]}"; do
      sdpa=(); [[ $pass != 1 ]] && sdpa=(--skip-sdpa)
      (cd packages/cacheflow-kernels/benchmarks && PYTHONPATH="/tmp/ab-site-$v" timeout 240 \
        python3 bench_paged_attention.py --partitions '' --l2-prefetch '' "${cases[@]}" \
        "${sdpa[@]}" --out "$out/bench_${v}_$pass.json" > "$out/bench_${v}_$pass.log" 2>&1)
      echo "bench $v pass $pass: rc $?, $(( $(date +%s) - t0 )) s"
    done
  done
  python3 tools/kernel_ab_table.py "$out" | tee "$out/ab_table.txt"
fi
