#!/usr/bin/env bash
# One device run for issue 13 (prefill attention and rotary): the GPU tests of
# paged_prefill_attention and rotary_embedding (new defaults and every previous choice switched
# back), then bench_paged_prefill.py over the issue's head sizes and bench_elementwise.py's rotary
# ops, each timing the new defaults and the previous kernels in the same process, and one short
# table. Logs and JSON under $OUT. Budget: under 5 minutes.
#
# Previous (before 2026-12-03), switched at call time:
#   prefill: CACHEFLOW_PREFILL_RESCALE_THRESHOLD=-1 (rescale O at every key tile),
#            CACHEFLOW_PREFILL_VARIANT=bn32 (head size 256: 32-key tiles, two K buffers),
#            (CTA order: group-major is the default again; CACHEFLOW_PREFILL_GRID=chunked times the
#            chunked longest-first order, slower on the H200 on 2026-12-03)
#   rotary:  the default is the block-per-token kernel again; CACHEFLOW_ROTARY=warp times the
#            warp-per-token kernel (slower on the H200, 2026-12-03)
#
# Mode "wgmma" checks the Hopper (sm_90a, wgmma) kernel instead: the prefill GPU tests (its own
# cases included), the prefill sanitizer sweep under memcheck and racecheck (both kernels), and
# the benchmark of default vs CACHEFLOW_PREFILL_VARIANT=wgmma vs SDPA flash, with a short table.
#
# Prepare here: tools/build_wheels.sh (wheels in .whl/); run there with carry [".whl"]:
#   bash tools/gpu_prefill_check.sh [tests|bench|all|wgmma]
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_prefill}"
mkdir -p "$out"
site=$(mktemp -d /tmp/site.XXXX)  # fresh: pip --target does not replace older copies
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
unset CACHEFLOW_PREFILL_RESCALE_THRESHOLD CACHEFLOW_PREFILL_VARIANT CACHEFLOW_PREFILL_GRID \
  CACHEFLOW_ROTARY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, cacheflow_kernels as k; print('torch', torch.__version__, 'kernels', k.__version__, k.cuda_available())" | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"
kdir=packages/cacheflow-kernels

if [[ "$what" == tests || "$what" == all ]]; then
  echo "== pytest -m gpu test_kernels_paged_prefill_gpu.py test_kernels_rotary_gpu.py"
  timeout 200 python3 -m pytest -p no:cacheprovider -m gpu -q -rfE \
    "$kdir/tests/test_kernels_paged_prefill_gpu.py" "$kdir/tests/test_kernels_rotary_gpu.py" \
    -o addopts="" 2>&1 | tee "$out/gpu_tests.log" | grep -E "passed|failed|Error" | tail -12
fi

if [[ "$what" == wgmma ]]; then
  echo "== pytest -m gpu test_kernels_paged_prefill_gpu.py (Hopper cases first)"
  timeout 120 python3 -m pytest -p no:cacheprovider -m gpu -q -rfE -x -k hopper \
    "$kdir/tests/test_kernels_paged_prefill_gpu.py" -o addopts="" 2>&1 \
    | tee "$out/gpu_tests_hopper.log" | grep -E "passed|failed|Error|assert" | tail -12
  timeout 200 python3 -m pytest -p no:cacheprovider -m gpu -q -rfE \
    "$kdir/tests/test_kernels_paged_prefill_gpu.py" -o addopts="" 2>&1 \
    | tee "$out/gpu_tests.log" | grep -E "passed|failed|Error" | tail -6
  echo "== bench_paged_prefill.py default vs wgmma vs SDPA flash"
  cases="mha_fp16_d128,gqa_fp16_d128,mha_bf16_d128,mha_fp16_d64,mha_fp16_d96,mha_fp16_d256"
  cases+=",prefix_fp16_d128,mixed_a_bf16_d128"
  timeout 150 python3 "$kdir/benchmarks/bench_paged_prefill.py" --cases "$cases" \
    --variants default,wgmma,wgmma_serial --iters 30 --out "$out/prefill.json" \
    > "$out/bench_prefill.log" 2>&1
  echo "prefill bench rc=$? (log: bench_prefill.log)"
  python3 - "$out/prefill.json" <<'PY' 2>&1 | tee "$out/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"prefill on {r['header']['device']}; graph ms; speed = SDPA time / ours")
by = {}
for x in r["results"]:
    by.setdefault(x["case"]["name"], {})[x["variant"]] = x
t_of = lambda x, k: x.get(f"{k}_graph_ms") or x.get(f"{k}_ms")
targets = {64: 0.95, 128: 0.95, 96: 0.85, 256: 0.85}
print(f"{'case':<20} {'mma ms':>7} {'wgmma ms':>8} {'serial':>7} {'SDPA ms':>7} {'mma spd':>7} "
      f"{'wg spd':>7} {'ser spd':>7} {'target':>6}  errors")
for name, v in by.items():
    d, w, z = v.get("default", {}), v.get("wgmma", {}), v.get("wgmma_serial", {})
    a, b, c, s = t_of(d, "ours"), t_of(w, "ours"), t_of(z, "ours"), t_of(d, "sdpa")
    f = lambda x, n=7: f"{x:{n}.3f}" if x else f"{'-':>{n}}"
    spd = lambda t: f"{s / t:.2f}x" if s and t else "-"
    t = targets.get(d.get("case", {}).get("head_size"))
    errs = "; ".join(e for x in v.values() for e in x.get("errors", []))
    print(f"{name:<20} {f(a)} {f(b, 8)} {f(c)} {f(s)} {spd(a):>7} {spd(b):>7} {spd(c):>7} "
          f"{(f'{t:.2f}x' if t else '-'):>6}  {errs}")
PY
  san=/usr/local/cuda/bin/compute-sanitizer
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool sanitizer_sweep.py --only paged_prefill"
    timeout 240 "$san" --tool "$tool" --error-exitcode 9 python3 "$kdir/tests/sanitizer_sweep.py" \
      --only paged_prefill > "$out/sanitizer_$tool.log" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|match" "$out/sanitizer_$tool.log" | tail -3
  done
fi

if [[ "$what" == bench || "$what" == all ]]; then
  echo "== bench_paged_prefill.py (new defaults vs previous vs SDPA flash)"
  cases="mha_fp16_d128,gqa_fp16_d128,mha_bf16_d128,mha_fp16_d64,mha_fp16_d96,mha_fp16_d256"
  cases+=",prefix_fp16_d128"
  timeout 150 python3 "$kdir/benchmarks/bench_paged_prefill.py" --cases "$cases" \
    --variants default,prev,eager,chunked,bn32,m64,w8 --iters 30 --out "$out/prefill.json" \
    > "$out/bench_prefill.log" 2>&1
  echo "prefill bench rc=$? (log: bench_prefill.log)"
  echo "== bench_elementwise.py rotary (default vs CACHEFLOW_ROTARY=warp)"
  timeout 60 python3 "$kdir/benchmarks/bench_elementwise.py" --only rotary_neox,rotary_gptj \
    --compare-alternative --out "$out/rotary.json" > "$out/bench_rotary.log" 2>&1
  echo "rotary bench rc=$? (log: bench_rotary.log)"
  python3 - "$out/prefill.json" "$out/rotary.json" <<'PY' 2>&1 | tee "$out/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError as e:
    print("prefill: no JSON:", e)
else:
    h = r["header"]
    print(f"prefill on {h['device']}, kernels {h['cacheflow_kernels']}; speed = SDPA time / ours")
    print("new = defaults; prev = all previous choices; eager/bn32 = that choice alone switched "
          "back, chunked = the chunked CTA order (time / new time)")
    by = {}
    for x in r["results"]:
        by.setdefault(x["case"]["name"], {})[x["variant"]] = x
    targets = {64: 0.95, 128: 0.95, 96: 0.85, 256: 0.85}
    print(f"{'case':<18} {'new ms':>7} {'prev ms':>7} {'SDPA ms':>7} {'new spd':>7} "
          f"{'prev spd':>8} {'target':>6} {'eager':>6} {'chunk':>6} {'bn32':>6} {'err':>8}")
    for name, v in by.items():
        new, prev = v.get("default", {}), v.get("prev", {})
        # graph-replay times (the kernels' own); eager ones from reports that lack them
        t_of = lambda x, k: x.get(f"{k}_graph_ms") or x.get(f"{k}_ms")
        n, p, s = t_of(new, "ours"), t_of(prev, "ours"), t_of(new, "sdpa")
        f = lambda x, w=7: f"{x:{w}.3f}" if x else f"{'-':>{w}}"
        spd = lambda t: f"{s / t:.2f}x" if s and t else "-"
        alone = [f"{t_of(v[k], 'ours') / n:6.3f}" if k in v and t_of(v[k], "ours") and n
                 else f"{'-':>6}" for k in ("eager", "chunked", "bn32")]
        t = targets.get(new.get("case", {}).get("head_size"))
        err = new.get("max_abs_diff_vs_sdpa")
        errs = "; ".join(e for x in v.values() for e in x.get("errors", []))
        print(f"{name:<18} {f(n)} {f(p)} {f(s)} {spd(n):>7} {spd(p):>8} "
              f"{(f'{t:.2f}x' if t else '-'):>6} {' '.join(alone)} "
              f"{(f'{err:.1e}' if err is not None else '-'):>8} {errs}")
try:
    e = json.load(open(sys.argv[2]))
except OSError as exc:
    print("rotary: no JSON:", exc)
else:
    print(f"\nrotary on {e['device']}, copy {e['copy']['gbps']:.0f} GB/s (target 80% of copy)")
    for x in e["results"]:
        prev = x.get("extra", {}).get("alternative", {})
        if x.get("error"):
            print(f"{x['op']:<26} ERROR {x['error']}")
            continue
        pt = prev.get("time_us")
        print(f"{x['op']:<26} default {x['time_us']:6.1f} us {x['pct_of_copy']:5.1f}% | warp "
              + (f"{pt:6.1f} us {prev.get('pct_of_copy', 0):5.1f}%" if pt else "-")
              + f" | max|diff| {x.get('max_abs_diff')}")
PY
fi
