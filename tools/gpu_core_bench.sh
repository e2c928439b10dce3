#!/usr/bin/env bash
# One device run for the runtime core: engine GPU tests, then the prefix-caching and the
# chunked-prefill serving benchmarks on a LLaMA-7B-shaped fp16 random checkpoint.
#
# Prepare here: tools/build_wheels.sh (wheels in .whl/); run there with carry [".whl"]:
#   bash tools/gpu_core_bench.sh [tests|prefix|serve|all]
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_core}"
mkdir -p "$out"
if [[ "$what" != serve-only ]]; then
  site=$(mktemp -d /tmp/site.XXXX)  # fresh: pip --target does not replace older copies
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$site" PYTHONUNBUFFERED=1
fi
cf() { python3 -m cacheflow_serve "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"

if [[ "$what" == tests || "$what" == all ]]; then
  timeout 240 python3 -m pytest -p no:cacheprovider -m "gpu and not slow" -q -rfE -x \
    packages/cacheflow-models/tests/test_gpu_engine.py \
    packages/cacheflow-serve/tests/test_preemption_gpu.py \
    packages/cacheflow-runtime/tests/test_attention_backends.py \
    -o addopts="" 2>&1 | tee "$out/gpu_tests.log" | tail -6
fi

ckpt=/tmp/llama7b
shape='{"preset": "llama-7b", "max_position_embeddings": 8192}'
if [[ "$what" != tests ]]; then
  python3 - "$ckpt" "$shape" <<'PY' 2>&1 | tail -2
import sys, time
from pathlib import Path
import torch
from cacheflow_serve.random_checkpoint import build_hf_config, hf_config_fields, write_random_checkpoint
t = time.time()
write_random_checkpoint(build_hf_config(hf_config_fields(sys.argv[2])), Path(sys.argv[1]),
                        torch.float16, torch.device("cuda"), 0, progress=False)
print(f"random 7B checkpoint written in {time.time() - t:.1f} s")
PY
fi

if [[ "$what" == prefix || "$what" == all ]]; then
  timeout 300 python3 -m cacheflow_serve bench prefix-caching --model "$ckpt" --dtype float16 \
    --num-prompts 256 --prefix-len 2048 --input-len 64 --output-len 128 --disable-tqdm \
    --output-json "$out/prefix_caching.json" 2>&1 | tee "$out/prefix_caching.log" | tail -5
fi

serve_run() {  # $1 name, rest: server flags
  local name="$1"; shift
  python3 -m cacheflow_serve serve "$ckpt" --dtype float16 --port 8100 --log-level warning \
    "$@" > "$out/server_$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 180); do
    curl -sf http://127.0.0.1:8100/health > /dev/null && break; sleep 1
  done
  timeout 150 python3 -m cacheflow_serve bench serve --base-url http://127.0.0.1:8100 \
    --random-prompt-tokens 10:250 --input-len 16:4096 --output-len 128 --ignore-eos \
    --num-prompts "${NUM_PROMPTS:-240}" --request-rate "${RATE:-6}" --seed 0 \
    --output-json "$out/serve_$name.json" 2>&1 | tee "$out/serve_$name.log" | tail -12
  kill -INT $pid; wait $pid
}
if [[ "$what" == serve || "$what" == serve-only || "$what" == all ]]; then
  serve_run chunked --max-num-batched-tokens "${CHUNK_BUDGET:-1024}"
  serve_run whole --no-enable-chunked-prefill
fi
