#!/usr/bin/env bash
# One device run for issue 13 (decode attention pipeline): the paged_attention GPU tests (every
# main loop: the shared-memory pipeline, the register kernel via CACHEFLOW_PA_PIPELINE=0, forced
# depths; FP8 caches), then bench_paged_attention.py over the issue's cases with the fp16 and
# fp8 caches, each timed with the pipelined kernel and the register kernel in the same process,
# and one short table. Logs and JSON under $OUT. Budget: under 6 minutes.
#
# Prepare here: tools/build_wheels.sh (wheels in .whl/); run there with carry [".whl"]:
#   bash tools/gpu_decode_check.sh [tests|bench|all]
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_decode}"
mkdir -p "$out"
site=$(mktemp -d /tmp/site.XXXX)  # fresh: pip --target does not replace older copies
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
unset CACHEFLOW_PA_PIPELINE CACHEFLOW_PA_STAGES CACHEFLOW_PA_L2_PREFETCH_TILES
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, cacheflow_kernels as k; print('torch', torch.__version__, 'kernels', k.__version__, k.cuda_available())" | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"

if [[ "$what" == tests || "$what" == all ]]; then
  echo "== pytest -m gpu test_kernels_paged_attention_gpu.py"
  timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rfE \
    packages/cacheflow-kernels/tests/test_kernels_paged_attention_gpu.py \
    -o addopts="" 2>&1 | tee "$out/gpu_tests.log" | grep -E "passed|failed|Error" | tail -12
fi

cases="mha_b64_ctx2k,gqa8_b64_ctx2k,mha_b1_ctx32k,gqa8_b1_ctx32k,gqa8_b8_ctx8k,mqa_b32_ctx4k"
cases+=",gqa4_b16_ctx4k_d64,mha_b16_ctx4k_d256,mha_b16_ctx8k"
cases+=",mha_b16_ctx8k_fp8,gqa8_b8_ctx8k_fp8,mha_b1_ctx32k_fp8,gqa8_b1_ctx32k_fp8"
if [[ "$what" == bench || "$what" == all ]]; then
  echo "== bench_paged_attention.py (pipeline vs register kernel)"
  timeout 180 python3 packages/cacheflow-kernels/benchmarks/bench_paged_attention.py \
    --out "$out/decode.json" --cases "$cases" --compare-register --partitions "" \
    --l2-prefetch "" --batches 11 > "$out/bench.log" 2>&1
  echo "bench rc=$? (log: bench.log)"
  python3 - "$out/decode.json" <<'PY' 2>&1 | tee "$out/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['device']} ({r['num_sms']} SMs), copy {r['copy_gbps']:.0f} GB/s, kernels "
      f"{r['cacheflow_kernels']}")
res = {x["case"]: x for x in r["results"]}
print(f"{'case':<22} {'split':>8} {'new us':>8} {'old us':>8} {'SDPA us':>8} {'ratio':>12} "
      f"{'%copy':>6} {'err':>8}")
for name, x in res.items():
    if x.get("error"):
        print(f"{name:<22} ERROR {x['error']}")
        continue
    split = f"{x['num_partitions']}x{x['partition_size']}" if x["num_partitions"] > 1 else "none"
    new, old, sdpa = x.get("time_us"), x.get("register_time_us"), x.get("sdpa_time_us")
    if name.endswith("_fp8"):  # speed-up over the same case with the 16-bit cache (new path)
        base = res.get(name[:-4], {}).get("time_us")
        ratio = f"{base / new:.2f}x fp16" if base and new else "-"
    else:
        ratio = f"{sdpa / new:.2f}x SDPA" if sdpa and new else "-"
    f = lambda v: f"{v:8.1f}" if v else f"{'-':>8}"
    pct = f"{100 * x['pct_of_copy']:5.1f}%" if x.get("pct_of_copy") else f"{'-':>6}"
    err = f"{x['max_rel_err']:.1e}" if x.get("max_rel_err") is not None else "-"
    print(f"{name:<22} {split:>8} {f(new)} {f(old)} {f(sdpa)} {ratio:>12} {pct} {err:>8}")
PY
fi
