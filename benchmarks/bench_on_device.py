"""Train step time fed by the on-device input vs a synthetic batch already on the device.

Both columns run the same compiled step in one process, alternating timed regions: (a) one
fixed batch made on the device, (b) `OnDeviceIterator` over a CIFAR-size in-memory dataset
(generated uint8 images; the content does not change the work), each batch passed through
`global_batch_from_host` as the training loop does. The augmentation alone (blocked per region)
is timed too. No TensorFlow is imported.

  --task pretrain: MAE pretraining (`pretrain_lib.model_spec`, `create_tx`, `make_loss_fn`, as
    `bench_train_step.py`); the input RandomResizedCrop(scale (0.2, 1)) + flip + bicubic resize.
  --task finetune: fine-tuning (`mae_jax.classification.finetune`: ViTClassifier, AdamW with
    layer decay, random erasing + Mixup / CutMix + label smoothing in the step); the input
    RandomResizedCrop(scale (0.08, 1)) + flip + RandAugment rand-m9-mstd0.5-inc1 (draws on the
    host, ops on the device) and labels.

    python benchmarks/bench_on_device.py --image_size 64 --batch_size 16 --num_images 5000 \
        --embed_dim 96 --depth 4 --num_heads 3 --decoder_depth 2 --decoder_width 128  # CPU
    python benchmarks/bench_on_device.py --batch_size 256 --dtype bfloat16           # one GPU
    python benchmarks/bench_on_device.py --task finetune --batch_size 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.classification import config as classification_config
from mae_jax.classification import finetune
from mae_jax.classification import lib as classification_lib
from mae_jax.core import hostmem, optim
from mae_jax.core import sharding as sharding_lib
from mae_jax.core.state import TrainState
from mae_jax.core.step import compile_step, make_train_step
from mae_jax.data.on_device import OnDeviceIterator
from mae_jax.models.layers import make_rngs
from mae_jax.models.registry import VARIANTS
from mae_jax.pretrain import config as pretrain_config
from mae_jax.pretrain import lib as pretrain_lib

NUM_CLASSES = 100  # CIFAR-100


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="pretrain", choices=("pretrain", "finetune"))
    parser.add_argument("--model", default="vit_tiny_patch16", choices=sorted(VARIANTS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=256, help="Global images per step.")
    parser.add_argument("--num_images", type=int, default=50_000, help="CIFAR-100 train: 50k.")
    parser.add_argument("--source_size", type=int, default=32, help="Stored image side.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per region.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed regions per input.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps after compile.")
    for name in ("patch_size", "embed_dim", "depth", "num_heads", "decoder_depth",
                 "decoder_width"):
        parser.add_argument(f"--{name}", type=int, default=0, help="0: the variant's.")
    parser.add_argument("--out_json", default="")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats, args.batch_size, args.num_images) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats, --batch_size, --num_images must be >= 1")
    return args


def build_config(args):
    finetuning = args.task == "finetune"
    config = classification_config.defaults("finetune") if finetuning else \
        pretrain_config.defaults()
    config.model.update(variant=args.model, image_size=args.image_size, dtype=args.dtype)
    for name in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(args, name):
            config.model[name] = getattr(args, name)
    if finetuning:
        config.update(batch_size=args.batch_size, grad_accum_steps=1, total_steps=1000,
                      warmup_steps=10)
        return config
    if args.decoder_depth:
        config.model.decoder_depth = args.decoder_depth
    if args.decoder_width:
        config.model.decoder_embed_dim = args.decoder_width
        config.model.decoder_num_heads = max(1, args.decoder_width // 32)
    config.update(batch_size=args.batch_size, total_steps=1000, warmup_steps=10)
    return config


def build_step(config, mesh):
    """(state, compiled step) of train.py's pretraining or, for a fine-tuning config, of
    finetune.py (the `mae_jax.pretrain.lib` / `mae_jax.classification.lib` wiring)."""
    finetuning = config.get("task") == "finetune"
    lib = classification_lib if finetuning else pretrain_lib
    schedule = optim.warmup_cosine_schedule(
        peak_lr=lib.peak_learning_rate(config), warmup_steps=config.warmup_steps,
        total_steps=config.total_steps,
    )
    if finetuning:
        spec = classification_lib.model_spec(config, NUM_CLASSES, global_pool=True)
        tx = finetune.create_tx(config, nnx.state(nnx.eval_shape(spec.build), nnx.Param),
                                schedule)
        loss_fn = finetune.make_loss_fn(config, NUM_CLASSES, mesh.size)  # as lib does
    else:
        spec, tx = pretrain_lib.model_spec(config.model), pretrain_lib.create_tx(config, schedule)
        # Batches arrive as uint8 and the pretraining loss normalises them inside the step.
        loss_fn = pretrain_lib.make_loss_fn(config.mask_ratio)
    state, state_shardings = sharding_lib.create_sharded(
        lambda: TrainState.create(spec.build(make_rngs(config.seed)), tx,
                                  rng_seed=config.seed + 1),
        mesh,
    )
    graphdef = nnx.split(nnx.eval_shape(spec.build), nnx.Param, ...)[0]
    step_fn = make_train_step(graphdef, loss_fn, tx, schedule)
    return state, compile_step(step_fn, state_shardings, mesh)


def timed(run, steps: int) -> float:
    """Seconds for `steps` calls of run() -> arrays, blocked once at the end."""
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return time.perf_counter() - start


def machine() -> str:
    devices = jax.devices()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), host {cpu}, "
            f"{cores} cores, jax {jax.__version__}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = build_config(args)
    devices = jax.devices()
    if args.task == "finetune":
        classification_config.check_config(config, task="finetune", num_devices=len(devices),
                                           num_processes=1)
    else:
        pretrain_config.check_config(config, num_devices=len(devices), num_processes=1)
    mesh = sharding_lib.create_mesh(data=-1, fsdp=1, devices=devices)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    state, train_step = build_step(config, mesh)

    shape = (args.batch_size, args.image_size, args.image_size, 3)
    make = lambda key: jax.random.randint(key, shape, 0, 256, jnp.int32).astype(jnp.uint8)  # noqa: E731
    synthetic = {"image": jax.jit(make, out_shardings=batch_sharding)(jax.random.key(1))}
    rng = np.random.default_rng(0)
    dataset = rng.integers(0, 256, (args.num_images, args.source_size, args.source_size, 3),
                           dtype=np.uint8)
    finetuning = {}
    if args.task == "finetune":
        labels = rng.integers(0, NUM_CLASSES, args.num_images)
        synthetic["label"] = labels[:args.batch_size].astype(np.int32)
        finetuning = {"labels": labels, "crop_scale": tuple(config.data.crop_scale),
                      "randaugment": config.data.randaugment}
    iterator = OnDeviceIterator(dataset, mesh=mesh, image_size=args.image_size,
                                global_batch_size=args.batch_size, seed=0, **finetuning)
    load_before = os.getloadavg()

    def synthetic_step():
        nonlocal state
        state, metrics = train_step(state, sharding_lib.global_batch_from_host(synthetic,
                                                                             batch_sharding))
        return metrics

    def on_device_step():
        nonlocal state
        batch = sharding_lib.global_batch_from_host(next(iterator), batch_sharding)
        state, metrics = train_step(state, batch)
        return metrics

    def augment_only():
        return next(iterator)["image"]

    runs = {"synthetic batch on device": synthetic_step,
            "on-device augmentation": on_device_step, "augmentation alone": augment_only}
    for run in runs.values():  # compile + warm up
        timed(run, 1 + args.warmup)
    regions = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: load drifts hit all inputs alike
        for name, run in runs.items():
            regions[name].append(1000 * timed(run, args.steps) / args.steps)
    # The host's share: the examples of a step (and RandAugment's draws), one thread.
    host_steps, host_start = 0, time.perf_counter()
    while time.perf_counter() - host_start < 1.0 or host_steps < 3:
        iterator.host_part(host_steps)
        host_steps += 1
    host_ms = 1000 * (time.perf_counter() - host_start) / host_steps
    cache = train_step._cache_size() if hasattr(train_step, "_cache_size") else None
    if cache not in (None, 1):
        raise RuntimeError(f"the train step compiled {cache} times: the two inputs differ")
    load_after = os.getloadavg()

    synthetic_regions = regions["synthetic batch on device"]
    base = statistics.median(synthetic_regions)
    rows = []
    for name, per_region in regions.items():
        # Paired: each region against the synthetic region run just before it (same load).
        paired = statistics.median(100 * (b - a) / a if name != "augmentation alone" else
                                   100 * b / a for a, b in zip(synthetic_regions, per_region,
                                                                strict=True))
        rows.append({"input": name, "ms_per_step_median": statistics.median(per_region),
                     "regions_ms": per_region, "paired_percent": paired,
                     "median_percent": 100 * (statistics.median(per_region) - base) / base})
    report = {
        "machine": machine(), "load_average_before": load_before,
        "load_average_after": load_after, "settings": vars(args),
        "dataset_bytes_per_device": iterator.dataset_bytes_per_device,
        "rows": rows, "host_ms_per_step": host_ms,
        "host_images_per_s": args.batch_size / host_ms * 1000,
    }
    dims = {k: config.model[k] for k in ("embed_dim", "depth", "num_heads", "patch_size",
                                         "decoder_embed_dim", "decoder_depth") if k in config.model}
    print(f"Machine: {report['machine']}; load average (1, 5, 15 min) before "
          f"{tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)}")
    what = (f"fine-tuning, {NUM_CLASSES} classes, input crop + flip + RandAugment "
            f"{config.data.randaugment}" if args.task == "finetune" else "MAE pretraining")
    print(f"{what}: {args.model} (overrides {dims}, None: the variant's), {args.dtype}, batch "
          f"{args.batch_size} at {args.image_size} px, uint8 batches; dataset "
          f"{args.num_images} x {args.source_size}x{args.source_size}x3 uint8 = "
          f"{iterator.dataset_bytes_per_device / 1e6:.1f} MB per device")
    print("\n| input | ms/step (median) | ms/step per region | overhead vs synthetic: medians "
          "| paired regions (median) |")
    print("|---|---:|---|---:|---:|")
    for row in rows:
        per_region = ", ".join(f"{v:.1f}" for v in row["regions_ms"])
        if row["input"] == "augmentation alone":
            overheads = f"- | {row['paired_percent']:.2f}% of a step"
        else:
            overheads = f"{row['median_percent']:+.1f}% | {row['paired_percent']:+.1f}%"
        print(f"| {row['input']} | {row['ms_per_step_median']:.1f} | {per_region} | "
              f"{overheads} |")
    draws = ", RandAugment draws" if args.task == "finetune" else ""
    print(f"\nHost part (which examples{draws}): "
          f"{host_ms:.3f} ms a step, {report['host_images_per_s']:,.0f} images/s on one "
          "thread.")
    if args.out_json:
        with open(args.out_json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()
    main()
