#!/usr/bin/env bash
# One prepared GPU check, for a session that is lent a GPU machine (not yet run: no GPU so far).
# Sized for one H200: every step has a timeout, and the suite starts no entry after 300 s, so
# ~10 minutes in all at worst (~6 expected).
#
# The GPU machine has jax, flax, optax, orbax, torch and pytest but not ml_collections, which
# the configs use. Here, first (pure-Python wheel, kept out of git by .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl ml_collections==1.1.0
# Then run this script there, carrying .whl:  bash benchmarks/gpu_check.sh
# It writes into $OUT (or /tmp/gpu_check): GPU name, parity test log, benchmark tables + JSON.
# Nothing here imports TensorFlow (the GPU machine has none).
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
export CUDA_VISIBLE_DEVICES=0

# 1. Parity with the official model on the GPU (float32, full-precision matmuls), and the
#    hand-written derivatives (LayerNorm VJP, softmax JVP, XLA attention incl. bf16) there.
#    tests/conftest.py defaults to the CPU, so name the GPU explicitly; `-o addopts=...`: one
#    process (pyproject's `-n 2` would start two on one GPU, and needs pytest-xdist).
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  timeout 100 python3 -m pytest -o "addopts=-m 'not slow'" -q -x tests/test_mae_parity.py tests/test_vit_options.py \
  tests/test_fast_ops.py 2>&1 | tee "$OUT/parity.txt"

# 2. The benchmark suite's GPU preset (benchmarks/suite.py; most important entries first): MAE
#    train step JAX vs PyTorch in bf16 at batch 256 for ViT-B and ViT-Tiny with the encoder on
#    all tokens too (MFU; the masking speed-up vs its FLOP ratio), the segmentation step's
#    device memory for 2 images (target <= 10 GB), evaluation images/s (ADE20K's protocol,
#    fixed-canvas path), the on-device CIFAR input vs a synthetic batch, the device parts of
#    the JPEG and ADE20K inputs, the segmentation step at the recipe's batch 16. Each entry has
#    its own timeout; none starts after 300 s, so the suite ends within ~7.5 minutes. One
#    table: $OUT/suite/suite.md, every report and log beside it.
timeout 480 python3 benchmarks/suite.py --preset gpu --out_dir "$OUT/suite" \
  --stop_starting_after 300 2>&1 | tee "$OUT/suite.txt"
# Killed by the timeout: the table of what finished, from suite.json (kept up to date).
[[ -f "$OUT/suite/suite.md" ]] || python3 benchmarks/suite.py --render "$OUT/suite" \
  >> "$OUT/suite.txt" 2>&1
cp "$OUT/suite/suite.md" "$OUT/suite.md" 2>/dev/null || true

# 3. bfloat16 vs float32 drift (per-block activation error, loss after a short demo run), if
#    there is time left.
if (( SECONDS < 450 )); then
  timeout 60 python3 benchmarks/bench_precision.py --train_steps 100 \
    2>&1 | tee "$OUT/precision.txt"
else
  echo "precision: skipped, $SECONDS s used" | tee -a "$OUT/skipped.txt"
fi
