"""Segmentation evaluation over images of distinct sizes: XLA compilations and images/s of the
fixed-canvas evaluation (`mae_jax.segmentation.evaluation.Evaluator`, "after") vs the previous
per-image path ("before": `sliding_window.slide_inference` with eager stitching + host metrics,
the loop the Evaluator ran before).

    python benchmarks/bench_seg_eval.py                          # CPU, a small segmenter
    python benchmarks/bench_seg_eval.py --variant vit_base_patch16 --patch_size 16 \
        --embed_dim 768 --depth 12 --num_heads 12 --channels 768 --aux_channels 256 \
        --num_classes 150 --window 512 --stride 341 --scale 2048,512 --dtype bfloat16 \
        --uint8 --out_json seg_eval_vitb.json                   # one GPU (ADE20K's protocol)

Images are generated (no data set, no TensorFlow): `--num_images` original sizes drawn around
the test scale (some portrait), each resized as mmcv's `rescale_size` to fit `--scale`; every
test-scale size and every label size is distinct. The model is segment.py's (`model_spec`) at
init. Each path runs a first pass over all images (compiles included; counted with JAX's
"/jax/core/compile/backend_compile_duration" event) and `--repeats` more passes over the same
images (steady state, everything compiled; for "before" that is generous: a real evaluation
meets most sizes once). Both paths must give identical per-class areas.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax.core import config as core_config
from mae_jax.core import hostmem
from mae_jax.core import sharding as sharding_lib
from mae_jax.core.state import TrainState
from mae_jax.models.layers import make_rngs
from mae_jax.segmentation import config as segmentation_config
from mae_jax.segmentation.evaluation import Evaluator
from mae_jax.segmentation.lib import model_spec
from mae_jax.segmentation.metrics import SegMetrics
from mae_jax.segmentation.sliding_window import num_windows, slide_inference

PATHS = ("before", "after")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_tiny_patch16")
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--embed_dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--channels", type=int, default=32, help="UPerNet channels.")
    parser.add_argument("--aux_channels", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--window", type=int, default=64, help="Window = model input size.")
    parser.add_argument("--stride", type=int, default=43)
    parser.add_argument("--scale", default="256,64", help="Test scale long,short (mmseg).")
    parser.add_argument("--num_images", type=int, default=50)
    parser.add_argument("--uint8", action="store_true", help="uint8 images (else float32).")
    parser.add_argument("--images_per_call", type=int, default=8)
    parser.add_argument("--windows_per_call", type=int, default=0, help="0: the default.")
    parser.add_argument("--tile", type=int, default=0, help="0: the default.")
    parser.add_argument("--tiles_per_call", type=int, default=0, help="0: the default.")
    parser.add_argument("--repeats", type=int, default=2, help="Steady-state passes.")
    parser.add_argument("--paths", default="before,after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_json", default="")
    args = parser.parse_args(argv)
    try:
        args.scale = tuple(int(v) for v in args.scale.split(","))
    except ValueError:  # QA: int()'s traceback
        parser.error(f"--scale {args.scale}: give long,short in pixels, e.g. 2048,512")
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if set(args.paths) - set(PATHS) or not args.paths:
        parser.error(f"--paths must list some of {PATHS}")
    if len(args.scale) != 2 or min(args.num_images, args.repeats, *args.scale) < 1:
        parser.error("--scale needs long,short; --num_images and --repeats must be >= 1")
    return args


def build_config(args: argparse.Namespace):
    """segment.py's config with this run's model and evaluation protocol."""
    config = segmentation_config.defaults()
    config.model.update(
        variant=args.variant, image_size=args.window, patch_size=args.patch_size or None,
        embed_dim=args.embed_dim or None, depth=args.depth or None,
        num_heads=args.num_heads or None, channels=args.channels,
        aux_channels=args.aux_channels, dtype=args.dtype,
    )
    depth = core_config.encoder_dims(config.model)["depth"]  # mmseg's blocks, clipped
    config.model.out_indices = tuple(min(i, depth - 1) for i in (3, 5, 7, 11))
    config.data.update(source="synthetic", num_classes=args.num_classes, scale=args.scale)
    config.update(eval_window=args.window, eval_stride=args.stride)
    return config


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size (keep ratio, fit (long, short)), as the eval pipeline resizes."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def make_examples(args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """`num_images` examples, every test-scale size and label size distinct."""
    rng = np.random.default_rng(args.seed)
    short_scale = min(args.scale)
    seen_images, seen_labels, examples = set(), set(), []
    while len(examples) < args.num_images:
        short = int(rng.integers(short_scale // 2, 2 * short_scale))
        ratio = float(rng.uniform(1.0, 2.5))
        size = (short, int(short * ratio))
        size = size[::-1] if rng.random() < 0.3 else size  # some portrait images
        test_size = rescale_size(*size, args.scale)
        if test_size in seen_images or size in seen_labels:
            continue
        seen_images.add(test_size)
        seen_labels.add(size)
        if args.uint8:
            image = rng.integers(0, 256, (*test_size, 3), dtype=np.uint8)
        else:
            image = rng.normal(size=(*test_size, 3)).astype(np.float32)
        label = rng.integers(0, args.num_classes, size).astype(np.int32)
        label[rng.random(size) < 0.1] = 255
        examples.append({"image": image, "label": label})
    return examples


class CompileCounter:
    """Counts XLA backend compilations in this process."""

    count = 0
    seconds = 0.0

    @classmethod
    def listen(cls, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            cls.count += 1
            cls.seconds += duration


def per_image_pass(forward, examples, config, num_classes: int) -> np.ndarray:
    """The previous Evaluator's loop: one image at a time, eager stitching, host metrics."""
    long_side, short_side = max(config.data.scale), min(config.data.scale)
    windows = max(num_windows(short_side, long_side, window=config.eval_window,
                              stride=config.eval_stride),
                  num_windows(long_side, short_side, window=config.eval_window,
                              stride=config.eval_stride))
    mean = np.asarray([123.675, 116.28, 103.53], np.float32)
    std = np.asarray([58.395, 57.12, 57.375], np.float32)
    metrics = SegMetrics(num_classes)
    for example in examples:
        image = example["image"]
        if image.dtype == np.uint8:  # the previous pipeline normalised on the host
            image = (image.astype(np.float32) - mean) / std
        logits = slide_inference(
            forward, jnp.asarray(image), num_classes=num_classes, window=config.eval_window,
            stride=config.eval_stride, output_size=example["label"].shape,
            pad_windows_to=windows,
        )
        metrics.update(np.asarray(jnp.argmax(logits, axis=-1)), example["label"])
    return metrics.areas


def bench_path(path: str, args, config, graphdef, state, examples) -> dict[str, Any]:
    if path == "before":
        forward = jax.jit(lambda windows: nnx.merge(graphdef, state.params, state.rest)(
            windows, train=False)[0].astype(jnp.float32))

        def run_pass():
            return per_image_pass(forward, examples, config, args.num_classes)
    else:
        mesh = sharding_lib.create_mesh(data=-1, fsdp=1)
        evaluator = Evaluator(
            config, graphdef, mesh, args.num_classes, "", None,
            images_per_call=args.images_per_call,
            windows_per_call=args.windows_per_call or None, tile=args.tile or None,
            tiles_per_call=args.tiles_per_call or None,
        )

        def run_pass():
            return evaluator.evaluate(state, examples)[0].areas  # host areas: blocks

    compiles, compile_s = CompileCounter.count, CompileCounter.seconds
    start = time.perf_counter()
    areas = run_pass()
    first_pass_s = time.perf_counter() - start
    compiles, compile_s = CompileCounter.count - compiles, CompileCounter.seconds - compile_s
    passes = []
    steady_compiles = CompileCounter.count
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_pass()
        passes.append(time.perf_counter() - start)
    return {
        "path": path,
        "compiles_first_pass": compiles,
        "compile_s": compile_s,
        "first_pass_s": first_pass_s,
        "compiles_steady": CompileCounter.count - steady_compiles,
        "steady_pass_s": passes,
        "images_per_s": len(examples) / statistics.median(passes),
        "areas": areas.tolist(),
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [d.device_kind for d in jax.devices()],
    }


def format_table(rows: list[dict[str, Any]], num_images: int) -> str:
    lines = [f"| path | compiles ({num_images} images) | compile s | first pass s | "
             "steady images/s | steady pass s | compiles after |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['compiles_first_pass']} | {r['compile_s']:.1f} | "
            f"{r['first_pass_s']:.1f} | {r['images_per_s']:.1f} | "
            f"{', '.join(f'{s:.2f}' for s in r['steady_pass_s'])} | {r['compiles_steady']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = build_config(args)
    spec = model_spec(config, args.num_classes)
    # Built in one compiled program: eagerly, ViT-B + UPerNet's initialisers are ~50 separate
    # compilations (14 s on a CPU), a large share of a GPU run's time limit for this entry.
    model = nnx.jit(lambda: spec.build(make_rngs(args.seed)))()
    # Evaluation only: an empty optimiser state.
    state = TrainState.create(model, optax.set_to_zero(), rng_seed=args.seed)
    graphdef = nnx.graphdef(model)
    examples = make_examples(args)
    windows = sum(num_windows(*e["image"].shape[:2], window=args.window, stride=args.stride)
                  for e in examples)
    jax.monitoring.register_event_duration_secs_listener(CompileCounter.listen)
    machine = machine_info()
    print("Machine:", ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(f"{len(examples)} images, {len(set(e['image'].shape for e in examples))} distinct "
          f"test-scale sizes, {windows} windows of {args.window} (stride {args.stride}), scale "
          f"{args.scale}, {args.num_classes} classes, {args.variant} "
          f"{core_config.encoder_dims(config.model)}, {args.dtype}, "
          f"{'uint8' if args.uint8 else 'float32'} images")
    rows = [bench_path(path, args, config, graphdef, state, examples) for path in args.paths]
    if len(rows) == 2:
        # The two paths compute the same windows in differently shaped programs, so float32
        # rounding may flip the argmax of a near-tie pixel (2026-12-03: 4 of 2.3M area counts
        # after the GELU change); more than 1e-5 of the counts is a real disagreement.
        before, after = np.asarray(rows[0]["areas"]), np.asarray(rows[1]["areas"])
        off = int(np.abs(before - after).sum())
        print(f"Per-class areas before / after: {off} of {int(before.sum())} counts differ")
        if off > 1e-5 * before.sum():
            raise RuntimeError("the two evaluation paths disagree")
    machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(format_table(rows, len(examples)))
    print("Load average at the end:", machine["load_average_after"])
    report = {"machine": machine, "settings": {k: v for k, v in vars(args).items()},
              "results": [{k: v for k, v in r.items() if k != "areas"} for r in rows]}
    if args.out_json:
        with open(args.out_json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()
    main()
