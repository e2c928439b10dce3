#!/usr/bin/env bash
# One device run for cascade attention and the session's GPU tests: the kernel's lse output,
# cascade vs plain decode, the engine GPU tests, the new architectures' bf16 agreement, then the
# prefix-caching benchmark on a LLaMA-7B-shaped fp16 random checkpoint.
#
# Prepare here: tools/build_wheels.sh (wheels in .whl/); run there with carry [".whl"]:
#   bash tools/gpu_cascade_check.sh [tests|bench|all]
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_cascade}"
mkdir -p "$out"
site=$(mktemp -d /tmp/site.XXXX)  # fresh: pip --target does not replace older copies
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, cacheflow_kernels as k; print('torch', torch.__version__, 'kernels', k.__version__, k.cuda_available())" | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"

if [[ "$what" == tests || "$what" == all ]]; then
  timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE \
    packages/cacheflow-kernels/tests/test_kernels_paged_attention_gpu.py \
    -k "log_sum_exp or benchmark_shape or split_modes" \
    -o addopts="" 2>&1 | tee "$out/gpu_tests_lse.log" | grep -E "passed|failed|Error" | tail -4
  timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -s \
    packages/cacheflow-runtime/tests/test_cascade_attention_gpu.py \
    -o addopts="" 2>&1 | tee "$out/gpu_tests_cascade.log" | grep -E "passed|failed|plain decode|Error" | tail -4
fi

ckpt=/tmp/llama7b
shape='{"preset": "llama-7b", "max_position_embeddings": 8192}'
if [[ "$what" == bench || "$what" == all ]]; then
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
  timeout 300 python3 -m cacheflow_serve bench prefix-caching --model "$ckpt" --dtype float16 \
    --num-prompts 256 --prefix-len 2048 --input-len 64 --output-len 128 --disable-tqdm \
    --output-json "$out/prefix_caching.json" 2>&1 | tee "$out/prefix_caching.log" | tail -8
fi

if [[ "$what" == tests || "$what" == all ]]; then
  models=(packages/cacheflow-models/tests/test_gpu_engine.py)
  if [[ -n "${WITH_ARCHS:-}" ]]; then
    models+=(packages/cacheflow-models/tests/test_gpu_dense_architectures.py
             packages/cacheflow-models/tests/test_moe_gpu.py)
  fi
  timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -p no:cacheprovider -m "gpu and not slow" -q -rfE -s \
    "${models[@]}" \
    packages/cacheflow-serve/tests/test_preemption_gpu.py \
    packages/cacheflow-runtime/tests/test_attention_backends.py \
    -o addopts="" 2>&1 | tee "$out/gpu_tests.log" | grep -E "passed|failed|agreement|Error" | tail -20
fi

