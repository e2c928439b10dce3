#!/usr/bin/env bash
# Issue 10 on the device, before and after in one run on one card: `cacheflow bench latency`
# (decode step at batches 1/64/256 next to the floors, the GPU's idle share) and `cacheflow
# bench throughput` (the 1,000-request mixed workload) on a LLaMA-7B-shaped fp16 random
# checkpoint: "base" with the runtime/models/serve wheels in .whl/base/ (an earlier commit),
# "off" and "on" with those in .whl/ and --no-async-scheduling / --async-scheduling ("on8k": with
# a step budget of 8,192 tokens; "b16k": 16,384; "mid": 512 sequences and 8,192 tokens; "big":
# 1,024 sequences and 16,384 tokens, vLLM's offline defaults on 70+ GiB cards (LLM's defaults
# there since 2026-12-07); "old": 256 and 2,048, the defaults before; "nodetok": with
# --disable-detokenize; "skinny": "on" with CACHEFLOW_SKINNY_GEMM=1 (the default since 2026-12-05); "cublas": "on" with
# CACHEFLOW_SKINNY_GEMM=0, one-row GEMMs on cuBLAS as before; "tworot": "on" with
# CACHEFLOW_ROTARY_CACHE=0, rotary and the cache write in two kernels as before 2026-12-05;
# "pdloff": "on" with skinny_gemm's and small decode grids' early releases off and skinny_gemm's
# ring at 4 stages, as before 2026-12-05 04:30; "st4": "on" with that ring only; "paoff": "on"
# without the small decode grids' early release; "fuse": "on" with CACHEFLOW_SKINNY_FUSE=1, the
# norms and residual adds of one-row steps inside skinny_gemm (the default since 2026-12-05
# 14:00; "nofuse": without it); "rotfuse": "on" with
# CACHEFLOW_ATTN_ROTARY_FUSE=1, decode steps' rotary and cache write inside the decode attention
# kernel at every batch size ("rotoff": =0, never; by default only for decode grids of at most
# one CTA per SM since 2026-12-06); "allfuse": both); "kbase": "on" with the kernel
# wheel in .whl/kbase/ (an earlier commit's kernels, for A/Bs of kernel changes that have no
# switch); "warps4": "on" with CACHEFLOW_PA_WARPS=4, the decode kernel's CTAs at 4 warps on
# small unsplit grids (batch 1-4 at 32 heads) as before 2026-12-05 19:00; the kernel and
# dependency wheels are otherwise the same for all.
#
# Prepare here: tools/build_wheels.sh, then the base wheels into .whl/base/; run there with
# carry [".whl"]:
#   bash tools/gpu_host_bench.sh [latency|throughput|all] [VARIANTS, default "base off on"]
# (throughput runs for base and on only unless TPUT_ALL=1: each takes about two minutes; with
# STEP_TRACE=1 it also writes trace_<variant>.jsonl and prints the per-step-kind excess table)
set -uo pipefail
what="${1:-all}"
read -r -a variants <<< "${2:-base off on}"
out="${OUT:-/tmp/gpu_host}"
mkdir -p "$out"
shared=$(ls .whl/*.whl | grep -v -E 'cacheflow_(runtime|models|serve)-')
declare -A site
sites=(new)
[[ " ${variants[*]} " == *" base "* ]] && sites+=(base)
[[ " ${variants[*]} " == *" kbase "* ]] && sites+=(kbase)
for v in "${sites[@]}"; do
  site[$v]=$(mktemp -d /tmp/site-$v.XXXX)  # fresh: pip --target does not replace older copies
  deps=$shared
  if [[ $v == base ]]; then mine=$(ls .whl/base/cacheflow_*.whl)
  else mine=$(ls .whl/cacheflow_runtime-*.whl .whl/cacheflow_models-*.whl .whl/cacheflow_serve-*.whl); fi
  if [[ $v == kbase ]]; then
    deps="$(ls .whl/*.whl | grep -v -E 'cacheflow_') $(ls .whl/kbase/cacheflow_kernels-*.whl)"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "${site[$v]}" $deps $mine || exit 1
done
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
date -u | tee -a "$out/card.txt"

ckpt=/tmp/llama7b
[[ -f "$ckpt/config.json" ]] || PYTHONPATH="${site[new]}" python3 - "$ckpt" <<'PY' 2>&1 | tail -1
import sys, time
from pathlib import Path
import torch
from cacheflow_serve.random_checkpoint import build_hf_config, hf_config_fields, write_random_checkpoint
t = time.time()
write_random_checkpoint(build_hf_config(hf_config_fields("llama-7b")), Path(sys.argv[1]),
                        torch.float16, torch.device("cuda"), 0, progress=False)
print(f"random 7B checkpoint written in {time.time() - t:.1f} s")
PY

for v in "${variants[@]}"; do
  flags=()
  unset CACHEFLOW_SKINNY_GEMM CACHEFLOW_ROTARY_CACHE CACHEFLOW_SKINNY_EARLY_RELEASE \
    CACHEFLOW_PA_EARLY_RELEASE CACHEFLOW_SKINNY_STAGES CACHEFLOW_SKINNY_FUSE \
    CACHEFLOW_ATTN_ROTARY_FUSE CACHEFLOW_PA_WARPS
  case $v in
    base) export PYTHONPATH="${site[base]}" ;;
    off) export PYTHONPATH="${site[new]}"; flags=(--no-async-scheduling) ;;
    on) export PYTHONPATH="${site[new]}"; flags=(--async-scheduling) ;;
    on8k) export PYTHONPATH="${site[new]}"; flags=(--async-scheduling --max-num-batched-tokens 8192) ;;
    old) export PYTHONPATH="${site[new]}"
      flags=(--async-scheduling --max-num-seqs 256 --max-num-batched-tokens 2048) ;;
    mid) export PYTHONPATH="${site[new]}"
      flags=(--async-scheduling --max-num-seqs 512 --max-num-batched-tokens 8192) ;;
    big) export PYTHONPATH="${site[new]}"
      flags=(--async-scheduling --max-num-seqs 1024 --max-num-batched-tokens 16384) ;;
    b16k) export PYTHONPATH="${site[new]}"; flags=(--async-scheduling --max-num-batched-tokens 16384) ;;
    nodetok) export PYTHONPATH="${site[new]}"; flags=(--async-scheduling --disable-detokenize) ;;
    skinny) export PYTHONPATH="${site[new]}" CACHEFLOW_SKINNY_GEMM=1; flags=(--async-scheduling) ;;
    cublas) export PYTHONPATH="${site[new]}" CACHEFLOW_SKINNY_GEMM=0; flags=(--async-scheduling) ;;
    tworot) export PYTHONPATH="${site[new]}" CACHEFLOW_ROTARY_CACHE=0; flags=(--async-scheduling) ;;
    pdloff) export PYTHONPATH="${site[new]}" CACHEFLOW_SKINNY_EARLY_RELEASE=0 \
      CACHEFLOW_PA_EARLY_RELEASE=0 CACHEFLOW_SKINNY_STAGES=4; flags=(--async-scheduling) ;;
    st4) export PYTHONPATH="${site[new]}" CACHEFLOW_SKINNY_STAGES=4; flags=(--async-scheduling) ;;
    paoff) export PYTHONPATH="${site[new]}" CACHEFLOW_PA_EARLY_RELEASE=0; flags=(--async-scheduling) ;;
    fuse) export PYTHONPATH="${site[new]}" CACHEFLOW_SKINNY_FUSE=1; flags=(--async-scheduling) ;;
    nofuse) export PYTHONPATH="${site[new]}" CACHEFLOW_SKINNY_FUSE=0; flags=(--async-scheduling) ;;
    rotfuse) export PYTHONPATH="${site[new]}" CACHEFLOW_ATTN_ROTARY_FUSE=1
      flags=(--async-scheduling) ;;
    rotoff) export PYTHONPATH="${site[new]}" CACHEFLOW_ATTN_ROTARY_FUSE=0
      flags=(--async-scheduling) ;;
    allfuse) export PYTHONPATH="${site[new]}" CACHEFLOW_SKINNY_FUSE=1 CACHEFLOW_ATTN_ROTARY_FUSE=1
      flags=(--async-scheduling) ;;
    kbase) export PYTHONPATH="${site[kbase]}"; flags=(--async-scheduling) ;;
    warps4) export PYTHONPATH="${site[new]}" CACHEFLOW_PA_WARPS=4; flags=(--async-scheduling) ;;
    *) echo "unknown variant $v"; exit 2 ;;
  esac
  if [[ "$what" == latency || "$what" == all ]]; then
    echo "== $v: latency"
    timeout 300 python3 -m cacheflow_serve bench latency --model "$ckpt" --dtype float16 \
      --batch-sizes "${BATCHES:-1,16,64,256}" --input-len 128 --output-len 128 --num-iters 1 \
      --num-iters-warmup 1 --disable-tqdm --output-json "$out/latency_$v.json" "${flags[@]}" \
      > "$out/latency_$v.log" 2>&1
    grep -B2 -A6 "^ *batch " "$out/latency_$v.log" | head -9
  fi
  if [[ "$what" == throughput || "$what" == all ]] && [[ $v != off || -n "${TPUT_ALL:-}" ]]; then
    echo "== $v: throughput"
    trace=(); [[ -n "${STEP_TRACE:-}" ]] && trace=(--step-trace "$out/trace_$v.jsonl")
    timeout 200 python3 -m cacheflow_serve bench throughput --model "$ckpt" --dtype float16 \
      --num-prompts 1000 --input-len 16:1024 --output-len 16:512 --seed 0 --disable-tqdm \
      --output-json "$out/throughput_$v.json" "${flags[@]}" "${trace[@]}" \
      > "$out/throughput_$v.log" 2>&1
    tail -"$([[ -n "${STEP_TRACE:-}" ]] && echo 30 || echo 5)" "$out/throughput_$v.log"
  fi
done
