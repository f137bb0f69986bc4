"""Segmentation train step (segment.py's): ms/step, images/s, compile time, peak memory, MFU.

The step is the one `segment.py` runs: MAE ViT + UPerNet (`MAESegmenter` built by
`mae_jax.segmentation.lib.model_spec`), decode + aux_weight x auxiliary cross-entropy
(`make_loss_fn`), AdamW with mmseg's layer-wise lr decay (`create_tx`), jitted by `compile_step`
over a data-parallel mesh of every device, with the state donated. The batch is synthetic and
lives on the device (uint8 images, uint8 labels with 10% ignored pixels and, as segment.py ships
with `data.device_photometric`, the photometric distortion's parameters: the step applies it),
so the input pipeline is not measured here (`bench_seg_input.py` is).

    python benchmarks/bench_seg_train_step.py                    # CPU: configs/seg_demo.py's model
    python benchmarks/bench_seg_train_step.py --config configs/ade20k_base.py \\
        --batch_size 2 --out_json seg_b2.json                     # GPU: memory for 2 images
    python benchmarks/bench_seg_train_step.py --config configs/ade20k_base.py --batch_size 16

Reported per row: ms/step (median and mean over `--repeats` regions of `--steps` steps, each
region blocking once at its end), images/s, the XLA compile time of the step, the device's peak
memory (`memory_stats()["peak_bytes_in_use"]`, everything the step holds: parameters, AdamW
moments, activations, batch; absent on CPU), the FLOPs XLA counts for one compiled step
(forward, backward and optimiser, convolutions included), TFLOP/s and MFU over the device's
peak (`bench_train_step.PEAK_TFLOPS`, or `--peak_tflops`). No TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import (  # noqa: E402
    CompileCounter,
    machine_info,
    peak_memory_gib,
    peak_tflops,
    summarize,
    time_regions,
    write_json,
)

from mae_jax.core import sharding as sharding_lib  # noqa: E402
from mae_jax.core.state import TrainState, tree_size  # noqa: E402
from mae_jax.core.step import compile_step, make_train_step  # noqa: E402
from mae_jax.data.seg_sources import num_seg_classes  # noqa: E402
from mae_jax.segmentation import lib as segment_lib  # noqa: E402
from mae_jax.segmentation.config import check_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/seg_demo.py",
                        help="A segment.py config file: its model, crop size, optimiser.")
    parser.add_argument("--batch_size", type=int, default=0, help="0: the config's.")
    parser.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                        help="'': the config's model.dtype.")
    parser.add_argument("--num_devices", type=int, default=0, help="0: every device.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per region.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed regions.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps after compile.")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="Peak dense TFLOP/s of one device in the model's dtype, for MFU "
                             "(0: bench_train_step.PEAK_TFLOPS for known GPUs in bfloat16).")
    parser.add_argument("--out_json", default="")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats) < 1 or min(args.warmup, args.batch_size, args.num_devices) < 0:
        parser.error("--steps and --repeats must be >= 1; --warmup, --batch_size and "
                     "--num_devices >= 0")
    if not os.path.exists(os.path.join(REPO, args.config)) and not os.path.exists(args.config):
        parser.error(f"--config {args.config}: no such file (e.g. configs/ade20k_base.py)")
    return args


def load_config(args: argparse.Namespace):
    """The config file's get_config() with this run's batch, dtype and step count."""
    path = args.config if os.path.exists(args.config) else os.path.join(REPO, args.config)
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.dtype:
        config.model.dtype = args.dtype
    config.mesh.update(data=-1, fsdp=1)
    config.grad_accum_steps = 1
    config.total_steps = 1 + args.warmup + args.steps * args.repeats
    config.warmup_steps = 1  # the step evaluates the lr schedule, as in training
    config.init_from = ""
    return config


def step_flops(compiled) -> float | None:
    """FLOPs XLA counts for one run of a compiled program on ONE device (the partitioned
    program each device runs); None where the backend has no count."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - optional: some backends do not implement it
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def bench(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args)
    devices = jax.devices()[: args.num_devices or None]
    check_config(config, num_devices=len(devices), num_processes=1)
    num_classes = num_seg_classes(config.data.source, num_classes=config.data.num_classes)
    mesh = sharding_lib.create_mesh(data=-1, fsdp=1, devices=devices)
    schedule = segment_lib.lr_schedule(config)
    spec = segment_lib.model_spec(config, num_classes)
    tx = segment_lib.create_tx(config, nnx.state(nnx.eval_shape(spec.build), nnx.Param), schedule)
    state, state_shardings = sharding_lib.create_sharded(
        lambda: TrainState.create(spec.build(nnx.Rngs(config.seed)), tx,
                                  rng_seed=config.seed + 1),
        mesh,
    )
    graphdef = nnx.split(nnx.eval_shape(spec.build), nnx.Param, ...)[0]
    step_fn = make_train_step(graphdef, segment_lib.make_loss_fn(config.aux_weight), tx, schedule)
    train_step = compile_step(step_fn, state_shardings, mesh)

    size, batch_size = config.model.image_size, config.batch_size

    def make_batch(key):
        image_key, label_key, ignore_key, photometric_key = jax.random.split(key, 4)
        shape = (batch_size, size, size)
        labels = jax.random.randint(label_key, shape, 0, num_classes)
        ignored = jax.random.uniform(ignore_key, shape) < 0.1
        batch = {"image": jax.random.randint(image_key, (*shape, 3), 0, 256).astype(jnp.uint8),
                 "label": jnp.where(ignored, 255, labels).astype(jnp.uint8)}
        if config.data.device_photometric:  # every distortion on (PARAMS order), whole crops
            batch["photometric"] = jnp.concatenate([
                jax.random.uniform(photometric_key, (batch_size, 7), minval=0.5, maxval=1.5),
                jnp.full((batch_size, 2), size, jnp.float32)], axis=1)
        return batch

    batch = jax.jit(make_batch, out_shardings=sharding_lib.batch_sharding(mesh))(
        jax.random.PRNGKey(1))
    jax.block_until_ready((state, batch))

    CompileCounter.install()
    compiles_before, seconds_before = CompileCounter.count, CompileCounter.seconds
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_wall_s = time.perf_counter() - start
    flops = step_flops(compiled)  # XLA counts one device's share of the SPMD program:
    flops = flops * len(devices) if flops else None  # 4 devices: a quarter of the batch each
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch))
    first_step_s = time.perf_counter() - start
    live = {"state": state, "metrics": metrics}  # the step donates the state it is given
    del state

    def step():
        live["state"], live["metrics"] = compiled(live["state"], batch)

    regions = time_regions(step, lambda: jax.block_until_ready(live), args)
    compiles = CompileCounter.count - compiles_before
    row = {
        "model": f"{config.model.variant} + UPerNet ({config.model.channels} ch)",
        "config": args.config,
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "dtype": config.model.dtype,
        "image_size": size,
        "batch": batch_size,
        "num_classes": num_classes,
        **summarize(regions, args.steps, batch_size),
        "compile_s": CompileCounter.seconds - seconds_before,
        "compile_wall_s": compile_wall_s,
        "compiles": compiles,
        "first_step_s": first_step_s,
        "peak_memory_gib": peak_memory_gib(mesh.devices.flat),
        "params": tree_size(live["state"].params),
        "loss": float(live["metrics"]["loss"]),
        "xla_tflop_per_step": flops / 1e12 if flops else None,
        "region_seconds": regions,
    }
    peak = peak_tflops(devices[0].device_kind, config.model.dtype, args.peak_tflops)
    tflops = flops * row["images_per_s"] / batch_size / 1e12 if flops else None
    row.update(tflops=tflops, peak_tflops_per_device=peak,
               mfu=tflops / (peak * len(devices)) if tflops and peak else None)
    return row


def format_table(row: dict[str, Any]) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    header = ("model", "device", "dtype", "crop", "batch", "ms/step med", "ms/step mean",
              "images/s", "compile s", "peak GiB", "XLA TFLOP/step", "TFLOP/s", "MFU")
    values = (row["model"], row["device"], row["dtype"], str(row["image_size"]),
              str(row["batch"]), cell(row["ms_per_step_median"], ".1f"),
              cell(row["ms_per_step_mean"], ".1f"), cell(row["images_per_s"], ".2f"),
              cell(row["compile_s"], ".1f"), cell(row["peak_memory_gib"], ".2f"),
              cell(row["xla_tflop_per_step"], ".4g"), cell(row["tflops"], ".3g"),
              cell(row["mfu"], ".1%"))
    lines = [header, ("---",) * len(header), values]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns {"machine", "settings", "result"}."""
    args = parse_args(argv)
    machine = machine_info()
    print("Machine:", ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("Load average (1, 5, 15 min):", os.getloadavg())
    row = bench(args)
    print(format_table(row))
    print("Load average after (1, 5, 15 min):", os.getloadavg())
    print(f"{row['params'] / 1e6:.2f}M trainable parameters, {row['num_classes']} classes; "
          f"{args.warmup} warmup + {args.repeats} x {args.steps} timed steps; "
          f"{row['compiles']} XLA compilation(s) from compiling the step to its last timed run; "
          f"final loss {row['loss']:.4f}. TFLOP/s: XLA's FLOP count of the compiled step "
          "(forward, backward, AdamW) x steps/s; MFU over the device's peak"
          + (f" ({row['peak_tflops_per_device']} TFLOP/s)." if row["mfu"] is not None
             else " (unknown here: --peak_tflops)."))
    report = {"machine": machine, "settings": vars(args), "result": row}
    return write_json(report, args.out_json)


if __name__ == "__main__":
    main()
