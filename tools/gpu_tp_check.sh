#!/usr/bin/env bash
# Tensor parallelism on a two-GPU machine (issue 12): NCCL collectives exact vs the CPU for
# fp16 / bf16 / fp32 and odd sizes, an all-reduce inside a captured CUDA graph, 256 MiB
# all-reduce bus bandwidth next to torch.distributed's NCCL, then tp=2 vs tp=1 through the
# engine on a random LLaMA-shaped checkpoint. Logs and JSON under $OUT.
#
# Prepare here (CPU machine), then run on the device (nvidia-h200-x2) with carry [".whl"]:
#   tools/build_wheels.sh
#   bash tools/gpu_tp_check.sh [collectives|engine|all]
# Dry run of the collective checks on a CPU (gloo, two processes):
#   python tools/gpu_tp_check.py collectives --device cpu
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_tp_check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())" \
  | tee -a "$out/card.txt"
status=0
if [[ "$what" == collectives || "$what" == all ]]; then
  timeout 300 python3 tools/gpu_tp_check.py collectives --device cuda --out "$out" 2>&1 \
    | tee "$out/collectives.log" | tail -80
  status=$((status | ${PIPESTATUS[0]}))
fi
if [[ "$what" == engine || "$what" == all ]]; then
  ckpt="$out/tiny-llama"
  python3 - "$ckpt" <<'PY' || exit 1
import sys
from cacheflow_models.testing import save_tiny_checkpoint, tiny_llama_config
# GQA (8 query heads, 2 KV heads), a vocabulary of 259 (odd), 4 layers.
save_tiny_checkpoint(sys.argv[1], tiny_llama_config(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=1024))
PY
  for dtype in float32 float16 bfloat16; do
    timeout 300 python3 tools/gpu_tp_check.py engine --model "$ckpt" --dtype "$dtype" \
      --out "$out/engine-$dtype" 2>&1 | tee "$out/engine-$dtype.log" | tail -5
    status=$((status | ${PIPESTATUS[0]}))
  done
fi
exit "$status"
