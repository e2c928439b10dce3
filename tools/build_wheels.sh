#!/usr/bin/env bash
# Builds what a device run installs into .whl/ (ignored by git): the kernel wheel for sm_90a
# hosts, the four cacheflow packages, and the cp312 wheels the device image lacks (the server's
# stack included).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
rm -rf .whl && mkdir -p .whl
MAX_JOBS="${MAX_JOBS:-2}" CACHEFLOW_CUDA_ARCHS="${CACHEFLOW_CUDA_ARCHS:-90}" \
  "$py" -m pip wheel -q --no-deps --no-build-isolation packages/cacheflow-kernels -w .whl
for p in runtime models serve; do "$py" -m pip wheel -q --no-deps packages/cacheflow-$p -w .whl; done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  "apache-tvm-ffi==0.1.15.post2" "gguf==0.19.0" "fastapi==0.165.0" "opentelemetry-api==1.45.2" \
  "starlette==1.10.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "uvicorn==0.55.0" \
  "annotated-types==0.8.0" "typing-inspection==0.4.5"
ls -la .whl
