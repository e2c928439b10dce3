#!/usr/bin/env bash
# One device run for issue 13 (decode attention): the paged_attention GPU tests (every main loop:
# the defaults, each earlier choice switched back alone, the register kernel, forced depths, FP8
# caches, CTAs of 32 vs 16 query heads, strided queries), reshape_and_cache's GPU tests (strided
# key/value rows) and the runtime's cuda-backend GPU tests (fused QKV views), then
# bench_paged_attention.py over the issue's cases with the fp16 and fp8 caches, each timed in
# the same process with the new defaults, "prev" (CTAs of 32 query heads for every group above
# 16, CACHEFLOW_PA_ROWS=32: the default until 2026-12-05), "dec03" (the first kernel of
# 2026-12-03: CTAs of 16, CACHEFLOW_PA_STEP=8 CACHEFLOW_PA_SPLIT=fill), the register kernel, the query read in place
# from a fused QKV output, and SDPA; one short table. Logs and JSON under $OUT.
# Budget: under 6 minutes (tests ~2, bench ~3).
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
unset CACHEFLOW_PA_PIPELINE CACHEFLOW_PA_STAGES CACHEFLOW_PA_L2_PREFETCH_TILES \
  CACHEFLOW_PA_STEP CACHEFLOW_PA_SPLIT CACHEFLOW_PA_RESCALE_THRESHOLD CACHEFLOW_PA_ROWS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, cacheflow_kernels as k; print('torch', torch.__version__, 'kernels', k.__version__, k.cuda_available())" | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"

if [[ "$what" == tests || "$what" == all ]]; then
  echo "== pytest -m gpu: paged_attention, reshape_and_cache, C++ argument checks"
  timeout 180 python3 -m pytest -p no:cacheprovider -m gpu -q -rfE \
    packages/cacheflow-kernels/tests/test_kernels_paged_attention_gpu.py \
    packages/cacheflow-kernels/tests/test_kernels_reshape_and_cache_gpu.py \
    -o addopts="" 2>&1 | tee "$out/gpu_tests.log" | grep -E "passed|failed|Error" | tail -12
  timeout 60 python3 -m pytest -p no:cacheprovider -q -rfE \
    packages/cacheflow-kernels/tests/test_kernels_paged_attention_args.py \
    packages/cacheflow-kernels/tests/test_kernels_arg_checks.py \
    -o addopts="" 2>&1 | tee "$out/arg_tests.log" | grep -E "passed|failed|Error" | tail -6
  echo "== pytest -m gpu: runtime cuda backend (fused QKV views)"
  timeout 60 python3 -m pytest -p no:cacheprovider -m gpu -q -rfE \
    packages/cacheflow-runtime/tests/test_attention_backends.py \
    -o addopts="" 2>&1 | tee "$out/runtime_tests.log" | grep -E "passed|failed|Error" | tail -6
fi

cases="mha_b64_ctx2k,gqa8_b64_ctx2k,mha_b1_ctx32k,gqa8_b1_ctx32k,gqa8_b8_ctx8k,mqa_b32_ctx4k"
cases+=",gqa4_b16_ctx4k_d64,mha_b16_ctx4k_d256,mha_b16_ctx8k"
cases+=",mha_b16_ctx8k_fp8,gqa8_b8_ctx8k_fp8,mha_b1_ctx32k_fp8,gqa8_b1_ctx32k_fp8"
if [[ "$what" == bench || "$what" == all ]]; then
  echo "== bench_paged_attention.py (new defaults vs prev vs dec03 vs register kernel vs SDPA)"
  timeout 240 python3 packages/cacheflow-kernels/benchmarks/bench_paged_attention.py \
    --out "$out/decode.json" --cases "$cases" --compare-register --compare-previous \
    --previous-variants previous,dec03 --strided-query \
    --partitions "" --l2-prefetch "" --batches 11 > "$out/bench.log" 2>&1
  echo "bench rc=$? (log: bench.log)"
  python3 - "$out/decode.json" <<'PY' 2>&1 | tee "$out/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['device']} ({r['num_sms']} SMs), copy {r['copy_gbps']:.0f} GB/s, kernels "
      f"{r['cacheflow_kernels']}")
print("new = defaults; prev = CACHEFLOW_PA_ROWS=32; dec03 = CACHEFLOW_PA_ROWS=16 CACHEFLOW_PA_STEP=8 "
      "CACHEFLOW_PA_SPLIT=fill; reg = CACHEFLOW_PA_PIPELINE=0.\nratio: SDPA/time (16-bit cases) "
      "or fp16 time/fp8 time (_fp8, same variant); prev/new: speed-up of new over prev; "
      "strQ: time with the query inside a fused QKV row / new")
res = {x["case"]: x for x in r["results"]}
print(f"{'case':<20} {'split new|prev':>15} {'new':>7} {'prev':>7} {'dec03':>7} {'reg':>7} "
      f"{'SDPA':>7} {'new ratio':>10} {'prev ratio':>10} {'%copy':>6} {'prev/new':>8} "
      f"{'strQ':>5} {'err':>7}")
f = lambda v, w=7: f"{v:{w}.1f}" if v else f"{'-':>{w}}"
for name, x in res.items():
    if x.get("error"):
        print(f"{name:<20} ERROR {x['error']}")
        continue
    prev = x.get("previous", {})
    split = f"{x['num_partitions']}x{x['partition_size']}" if x["num_partitions"] > 1 else "none"
    split += "|" + (x.get("previous_split", {}).get("previous") or "?")
    new, reg, sdpa = x.get("time_us"), x.get("register_time_us"), x.get("sdpa_time_us")
    pv, d3 = prev.get("previous"), prev.get("dec03")
    if name.endswith("_fp8"):
        base = res.get(name[:-4], {})
        bnew, bprev = base.get("time_us"), base.get("previous", {}).get("previous")
        rn = f"{bnew / new:.2f}x fp16" if bnew and new else "-"
        rp = f"{bprev / pv:.2f}x fp16" if bprev and pv else "-"
    else:
        rn = f"{sdpa / new:.2f}x" if sdpa and new else "-"
        rp = f"{sdpa / pv:.2f}x" if sdpa and pv else "-"
    pct = f"{100 * x['pct_of_copy']:5.1f}%" if x.get("pct_of_copy") else f"{'-':>6}"
    gain = f"{pv / new:8.2f}" if pv and new else f"{'-':>8}"
    sq = x.get("strided_query_us")
    strq = f"{sq / new:5.2f}" if sq and new else f"{'-':>5}"
    err = f"{x['max_rel_err']:.0e}" if x.get("max_rel_err") is not None else "-"
    print(f"{name:<20} {split:>15} {f(new)} {f(pv)} {f(d3)} {f(reg)} {f(sdpa)} {rn:>10} "
          f"{rp:>10} {pct} {gain} {strq} {err:>7}")
PY
fi
