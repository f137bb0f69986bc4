#!/usr/bin/env bash
# One prepared GPU check, for a session that is lent a GPU machine (not yet run: no GPU so far).
#
# The GPU machine has jax, flax, optax, orbax, torch and pytest but not ml_collections, which
# the configs use. Here, first (pure-Python wheel, kept out of git by .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl ml_collections==1.1.0
# Then run this script there, carrying .whl:  bash benchmarks/gpu_check.sh
# It writes into $OUT (or /tmp/gpu_check): GPU name, parity test log, benchmark tables + JSON.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. Parity with the official model on the GPU (float32, full-precision matmuls; tests/conftest.py
#    defaults to the CPU, so name the GPU explicitly).
CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  timeout 240 python3 -m pytest -q -x tests/test_mae_parity.py tests/test_vit_options.py \
  2>&1 | tee "$OUT/parity.txt"

# 2. Train step, JAX vs PyTorch, bfloat16, batch 256 (JAX attention: cuDNN fused kernel).
for model in vit_tiny_patch16 vit_base_patch16; do
  timeout 240 python3 benchmarks/bench_train_step.py --dtype bfloat16 --batch_size 256 \
    --model "$model" --out_json "$OUT/${model}_bf16_b256.json" 2>&1 | tee "$OUT/${model}.txt"
done
