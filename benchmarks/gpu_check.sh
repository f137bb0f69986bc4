#!/usr/bin/env bash
# One prepared GPU check, for a session that is lent a GPU machine (not yet run: no GPU so far).
# Sized for one H200 or H100 (the device tool's default kind since 2026-12; both 989.4 TFLOP/s
# dense bf16 in bench_train_step.PEAK_TFLOPS, and the H100's 78 GiB hold every entry but
# perhaps seg_train_b16 (batch 16 at 512 px), which fails alone if not) and the device tool's
# 10-minute command limit: every step has a timeout
# (preflight 60 s, parity tests 90 s, the suite 420 s and no entry started after 270 s, the
# precision check 60 s only while under 450 s): 9.5 minutes at worst, ~6 expected.
#
# The GPU machine (/work/.library/device/KINDS.md, 2026-11) has Python 3.12, jax 0.11.2 with the
# CUDA 13 plugin, flax, optax, orbax, torch 2.11 (CUDA), transformers and pytest, but not
# ml_collections, which the configs use, and its flax version is unrecorded. Our Python 3.11
# pin, flax 0.12.8, does not import under jax 0.11.2 (jax.experimental.hijax has no
# HiPrimitive); flax 0.12.12, the Python 3.12 pin, does, and every script below ran with it on a
# CPU under Python 3.12 + jax 0.11.2 (2026-12-03). Here, first (pure-Python wheels, kept out
# of git by .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl ml_collections==1.1.0 flax==0.12.12
# Then run this script there, carrying .whl:  bash benchmarks/gpu_check.sh
# It writes into $OUT (or /tmp/gpu_check) at most 8 files (the device tool brings back no
# more): gpu.txt (GPU, versions, backend), parity.txt, suite.txt, suite.md, suite.tgz (every
# entry's log and JSON report), precision.txt, profile_trace.json.gz (3 traced steps of ViT-B,
# for ui.perfetto.dev). Nothing here imports TensorFlow (the GPU machine
# has none).
#
# Rehearsal on a CPU machine (the same steps at the suite's smoke sizes; checks this script and
# what it leaves in $OUT, not the GPU):  GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh
# Best in a Python 3.12 venv holding the GPU machine's versions and no TensorFlow (jax 0.11.2,
# optax, orbax-checkpoint, einops, numpy, pillow, safetensors, torch, transformers, pytest, and
# flax's own dependencies), with .whl as above: there the smoke preset's two host-input entries
# (`input`, `seg_input`) fail for want of TensorFlow, and everything else must pass.
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
# JAX on the GPU or not at all: without this a failed CUDA plugin falls back to the CPU with a
# warning, and ViT-B at batch 256 would grind there until every entry timed out.
export JAX_PLATFORMS=cuda PRESET=gpu
if [[ -n "${GPU_CHECK_REHEARSAL:-}" ]]; then export JAX_PLATFORMS=cpu PRESET=smoke; fi
if ! timeout 60 python3 - 2>&1 <<'PY' | tee -a "$OUT/gpu.txt"; then
import importlib.metadata as md
import jax
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "torch",
             "transformers", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
import flax
print("flax imported from", flax.__file__)
print("backend", jax.default_backend(), jax.devices())
import os
want = "cpu" if os.environ.get("GPU_CHECK_REHEARSAL") else "gpu"
assert jax.default_backend() == want, f"JAX runs on {jax.default_backend()}, not {want}"
PY
  echo "preflight failed: JAX is not on the GPU; nothing else run" | tee -a "$OUT/gpu.txt"
  exit 1
fi

# 1. Parity with the official model on the GPU (float32, full-precision matmuls), the
#    hand-written derivatives (LayerNorm VJP, softmax JVP, XLA attention incl. bf16) there,
#    and RandAugment's device ops against PIL (no TensorFlow in that test).
#    JAX_PLATFORMS=cuda (above) overrides tests/conftest.py's CPU default; `-o addopts=...`: one
#    process (pyproject's `-n 2` would start two on one GPU, and needs pytest-xdist).
#    No -x: one failed comparison must not hide the others in a one-shot run.
JAX_DEFAULT_MATMUL_PRECISION=highest \
  timeout 90 python3 -m pytest -o "addopts=-m 'not slow'" -q tests/test_mae_parity.py tests/test_vit_options.py \
  tests/test_fast_ops.py tests/test_randaugment_device_ops.py > "$OUT/parity.txt" 2>&1 \
  || echo "parity: exit $? (1: a test failed; 124: cut off at 90 s)" >> "$OUT/parity.txt"
tail -3 "$OUT/parity.txt"

# 2. The benchmark suite's GPU preset (benchmarks/suite.py; most important entries first): MAE
#    train step JAX vs PyTorch in bf16 at batch 256 for ViT-B with the encoder on all tokens
#    too (MFU; the masking speed-up vs its FLOP ratio), the segmentation step's device memory
#    for 2 images (target <= 10 GB), evaluation images/s (ADE20K's protocol, fixed-canvas
#    path), the same MAE rows for ViT-Tiny, the on-device CIFAR input vs a synthetic batch, the
#    device parts of the JPEG and ADE20K inputs and of fine-tuning's RandAugment, the
#    segmentation step at the recipe's batch 16. Each entry has its own timeout; none starts
#    after 270 s, so the suite ends within 7 minutes. One table: $OUT/suite.md; every entry's
#    report and log in $OUT/suite.tgz.
#    The table is rewritten into $OUT after every entry (and each train entry's report after
#    every row), so a run stopped at the device tool's limit still brings back what finished.
SUITE=/tmp/gpu_check_suite
rm -rf "$SUITE"  # a rerun on the same warm machine: no earlier run's reports
timeout 420 python3 benchmarks/suite.py --preset "$PRESET" --out_dir "$SUITE" \
  --stop_starting_after 270 --table_copy "$OUT/suite.md" 2>&1 | tee "$OUT/suite.txt"
# The table again from suite.json (kept up to date): after a timeout it also holds the rows the
# killed entry had written.
python3 benchmarks/suite.py --render "$SUITE" > /dev/null 2>> "$OUT/suite.txt"
cp "$SUITE/suite.md" "$OUT/suite.md" 2>/dev/null || true
# The end of every entry's log in suite.txt (a crash's traceback), all of them in one archive.
for log in "$SUITE"/*.txt; do
  [[ -f "$log" ]] && { echo "== tail of $(basename "$log")"; tail -25 "$log"; } >> "$OUT/suite.txt"
done
# The traces stay out of the archive (XSpace files can outgrow the 16 MiB a file brings back);
# the ViT-B step's Perfetto trace comes back on its own when small enough. Its ops, summed
# (benchmarks/trace_summary.py), are in train_base.json / .txt either way.
tar czf "$OUT/suite.tgz" --exclude='*_profile' -C "$(dirname "$SUITE")" "$(basename "$SUITE")" \
  2>/dev/null || true
# (train_*: the gpu preset profiles train_base alone; the rehearsal's smoke preset train_tiny.)
TRACE=$(ls "$SUITE"/train_*_profile/plugins/profile/*/perfetto_trace.json.gz 2>/dev/null \
  | tail -1)
if [[ -n "$TRACE" ]] && (( $(stat -c %s "$TRACE") < 15000000 )); then
  cp "$TRACE" "$OUT/profile_trace.json.gz"
fi

# 3. bfloat16 vs float32 drift (per-block activation error, loss after a short demo run), if
#    there is time left.
if (( SECONDS < 450 )); then
  timeout 60 python3 benchmarks/bench_precision.py --train_steps 100 \
    2>&1 | tee "$OUT/precision.txt" \
    || echo "precision: exit $? (124: cut off at 60 s)" | tee -a "$OUT/precision.txt"
else
  echo "precision: skipped, $SECONDS s used" | tee -a "$OUT/suite.txt"
fi
