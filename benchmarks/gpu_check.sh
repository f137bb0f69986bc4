#!/usr/bin/env bash
# One prepared GPU check, for a session that is lent a GPU machine (not yet run: no GPU so far).
# Sized for one H200: every step has a timeout; step 7 runs only while under 7 minutes, so
# ~9 minutes in all at worst.
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

# 2. Train step, JAX vs PyTorch, bfloat16, batch 256 (JAX attention: cuDNN fused kernel);
#    ViT-B also with the encoder on all tokens (the paper's masking speed-up vs FLOP ratio).
timeout 90 python3 benchmarks/bench_train_step.py --dtype bfloat16 --batch_size 256 \
  --model vit_tiny_patch16 --steps 5 --repeats 3 --warmup 2 \
  --out_json "$OUT/vit_tiny_patch16_bf16_b256.json" 2>&1 | tee "$OUT/vit_tiny_patch16.txt"
timeout 120 python3 benchmarks/bench_train_step.py --dtype bfloat16 --batch_size 256 \
  --model vit_base_patch16 --steps 5 --repeats 3 --warmup 2 --encoder_all_tokens \
  --out_json "$OUT/vit_base_patch16_bf16_b256.json" 2>&1 | tee "$OUT/vit_base_patch16.txt"

# 3. bfloat16 vs float32 drift (per-block activation error, loss after a short demo run).
timeout 60 python3 benchmarks/bench_precision.py --train_steps 100 \
  2>&1 | tee "$OUT/precision.txt"

# 4. Pretraining fed by the on-device input vs a synthetic on-device batch (ViT-Tiny, bf16).
timeout 60 python3 benchmarks/bench_on_device.py --batch_size 256 --dtype bfloat16 \
  --num_images 10000 --steps 5 --repeats 2 --out_json "$OUT/on_device.json" \
  2>&1 | tee "$OUT/on_device.txt"

# 5. The device part of the JPEG input with device_resize_canvas=512 (resize + flip of 64
#    canvases; the host part needs TensorFlow: measured on CPU machines by bench_input.py).
JAX_PLATFORMS=cuda timeout 40 python3 benchmarks/bench_input.py --device_part --seconds 5 \
  2>&1 | tee "$OUT/input_device_part.txt"
#    And the segmentation input's device part: photometric distortion + normalisation of
#    16 crops of 512 x 512 (the host part: bench_seg_input.py on CPU machines).
JAX_PLATFORMS=cuda timeout 40 python3 benchmarks/bench_seg_input.py --device_part --seconds 5 \
  2>&1 | tee -a "$OUT/input_device_part.txt"

# 6. Segmentation evaluation (ViT-B UPerNet, ADE20K's sliding-window protocol), fixed-canvas
#    path only (the per-image "before" path compiles per size: minutes).
timeout 60 python3 benchmarks/bench_seg_eval.py --variant vit_base_patch16 --patch_size 16 \
  --embed_dim 768 --depth 12 --num_heads 12 --channels 768 --aux_channels 256 \
  --num_classes 150 --window 512 --stride 341 --scale 2048,512 --dtype bfloat16 --uint8 \
  --num_images 20 --repeats 1 --paths after --out_json "$OUT/seg_eval_vitb.json" \
  2>&1 | tee "$OUT/seg_eval.txt"

# 7. Segmentation train step, ViT-B/16 UPerNet at 512 (configs/ade20k_base.py, bf16): device
#    memory for 2 images (target <= 10 GB), then the recipe's batch 16 (images/s, MFU). Each run
#    starts only while the script is under 7 minutes, so the whole check stays under ~9.
for batch in 2 16; do
  if (( SECONDS > 420 )); then
    echo "step 7, batch $batch: skipped, $SECONDS s used" | tee -a "$OUT/skipped.txt"; continue
  fi
  timeout 70 python3 benchmarks/bench_seg_train_step.py --config configs/ade20k_base.py \
    --batch_size $batch --steps 3 --repeats 2 --warmup 1 \
    --out_json "$OUT/seg_train_b$batch.json" 2>&1 | tee "$OUT/seg_train_b$batch.txt"
done
