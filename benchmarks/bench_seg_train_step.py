"""Segmentation train step (segment.py's): ms/step, images/s, compile time, peak memory, MFU.

The step is the one `segment.py` runs: MAE ViT + UPerNet (`MAESegmenter` built by
`mae_jax.segmentation.lib.model_spec`), decode + aux_weight x auxiliary cross-entropy
(`make_loss_fn`), AdamW with mmseg's layer-wise lr decay (`create_tx`), jitted by `compile_step`
over a data-parallel mesh of every device, with the state donated. The batch is synthetic and
lives on the device (uint8 images, uint8 labels with 10% ignored pixels and, as segment.py ships
with `data.device_photometric`, the photometric distortion's parameters: the step applies it),
so the input pipeline is not measured here (`bench_seg_input.py` is).

`--frameworks jax,torch` adds PyTorch's step on the same architecture: transformers'
`BeitForSemanticSegmentation` (BEiT's port of the mmseg ViT + UPerNet that the MAE / BEiT ADE20K
recipes train: layer scale, per-block relative position bias, the 4-scale deconvolution neck,
UPerHead with PPM (1, 2, 3, 6), the FCN auxiliary head, cross-entropy on logits resized to the
labels with 255 ignored, aux weight 0.4), configured from the same config (width, depth, heads,
patch, crop, feature blocks, channels, drop path, layer scale, classes), trained with
torch.optim.AdamW over mmseg's layer-decay parameter groups, float32 on a CPU (bf16 autocast on
CUDA with `--dtype bfloat16`), eager attention as mmseg computes it. It is fed the same
synthetic batch as normalised float images: the official pipeline applies the photometric
distortion on the host, so `--no_device_photometric` times our step without the distortion too
(`bench_seg_input.py --device_part` times it alone). On a CPU each framework runs in a fresh
process of its own (`--processes auto`, as `bench_train_step.py`). XLA's FLOP count of our step
gives both rows' TFLOP/s (the parameter counts are printed side by side).

    python benchmarks/bench_seg_train_step.py                    # CPU: configs/seg_demo.py's model
    python benchmarks/bench_seg_train_step.py --config configs/ade20k_base.py \\
        --batch_size 2 --out_json seg_b2.json                     # GPU: memory for 2 images
    python benchmarks/bench_seg_train_step.py --config configs/ade20k_base.py --batch_size 16
    python benchmarks/bench_seg_train_step.py --config configs/ade20k_base.py \\
        --batch_size 2 --compile_only                             # any machine: XLA's plan
    python benchmarks/bench_seg_train_step.py --config configs/ade20k_base.py --image_size 256 \\
        --batch_size 2 --dtype float32 --frameworks jax,torch      # CPU: ours vs PyTorch

Reported per row: ms/step (median and mean over `--repeats` regions of `--steps` steps, each
region blocking once at its end), images/s, the XLA compile time of the step, the device's peak
memory (`memory_stats()["peak_bytes_in_use"]`, everything the step holds: parameters, AdamW
moments, activations, batch; absent on CPU) and what XLA planned when compiling it
(`memory_analysis()`: arguments + outputs + temporaries - donated), the FLOPs XLA counts for
one step as lowered (forward, backward and optimiser, convolutions included; before
compilation, where a GPU's library calls may drop out of the count), TFLOP/s and MFU over the
device's peak (`bench_train_step.PEAK_TFLOPS`, or `--peak_tflops`). No TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
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
    compiled_memory_gib,
    in_own_process,
    machine_info,
    memory_plan_gib,
    peak_memory_gib,
    peak_tflops,
    run_guarded,
    summarize,
    time_regions,
    time_torch_step,
    write_json,
)

from mae_jax.core import config as core_config  # noqa: E402
from mae_jax.core import hostmem  # noqa: E402
from mae_jax.core import sharding as sharding_lib  # noqa: E402
from mae_jax.core.state import TrainState, tree_size  # noqa: E402
from mae_jax.core.step import compile_step, make_train_step  # noqa: E402
from mae_jax.data.seg_sources import num_seg_classes  # noqa: E402
from mae_jax.models import convolution  # noqa: E402
from mae_jax.models.layers import make_rngs  # noqa: E402
from mae_jax.segmentation import lib as segment_lib  # noqa: E402
from mae_jax.segmentation.config import check_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("jax", "torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/seg_demo.py",
                        help="A segment.py config file: its model, crop size, optimiser.")
    parser.add_argument("--batch_size", type=int, default=0, help="0: the config's.")
    parser.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                        help="'': the config's model.dtype.")
    parser.add_argument("--image_size", type=int, default=0,
                        help="Crop size (0: the config's model.image_size).")
    parser.add_argument("--no_device_photometric", action="store_true",
                        help="Time our step without the photometric distortion the config "
                             "leaves to the device (the official pipeline runs it on the host).")
    parser.add_argument("--frameworks", default="jax",
                        help="Comma list of jax (segment.py's step) and torch (transformers' "
                             "BeitForSemanticSegmentation, needs torch and transformers).")
    parser.add_argument("--torch_attention", default="eager", choices=("eager", "sdpa"),
                        help="transformers' attention for the torch row (eager: as mmseg).")
    parser.add_argument("--processes", default="auto", choices=("auto", "one", "each"),
                        help="each: every framework in a fresh process of its own; one: all "
                             "in this process; auto: each on a CPU, one on a GPU.")
    parser.add_argument("--num_devices", type=int, default=0, help="0: every device.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per region.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed regions.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps after compile.")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="Peak dense TFLOP/s of one device in the model's dtype, for MFU "
                             "(0: bench_train_step.PEAK_TFLOPS for known GPUs in bfloat16).")
    parser.add_argument("--compile_only", action="store_true",
                        help="Compile our step for shapes alone (no parameters, no batch made) "
                             "and report XLA's memory plan and FLOP count without running it: "
                             "what a config needs on a device, checked on any machine. On a "
                             "CPU, XLA holds the bfloat16 operands of products as float32 "
                             "copies (the attention probabilities, for one), so a bfloat16 plan "
                             "there is not a GPU's. The timing options do not apply.")
    parser.add_argument("--out_json", default="")
    args = parser.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(args.frameworks) - set(FRAMEWORKS)
    if unknown or not args.frameworks:
        parser.error(f"--frameworks must list some of {FRAMEWORKS}, got {sorted(unknown)}")
    if args.compile_only and args.frameworks != ["jax"]:
        parser.error("--compile_only compiles our step only: use it with --frameworks jax")
    if min(args.steps, args.repeats) < 1 or min(args.warmup, args.batch_size, args.num_devices,
                                                args.image_size) < 0:
        parser.error("--steps and --repeats must be >= 1; --warmup, --batch_size, "
                     "--num_devices and --image_size >= 0")
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
    if args.image_size:
        config.model.image_size = config.eval_window = args.image_size
        config.eval_stride = min(config.eval_stride, args.image_size)
    if args.no_device_photometric:
        config.data.device_photometric = False
    config.mesh.update(data=-1, fsdp=1)
    config.grad_accum_steps = 1
    config.total_steps = 1 + args.warmup + args.steps * args.repeats
    config.warmup_steps = 1  # the step evaluates the lr schedule, as in training
    config.init_from = ""
    return config


def step_flops(compiled) -> float | None:
    """FLOPs XLA counts for one run of a compiled program on ONE device (the partitioned
    program each device runs), or of a lowered one (before partitioning: all devices); None
    where the backend has no count."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - optional: some backends do not implement it
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def bench_jax(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args)
    devices = jax.devices()[: args.num_devices or None]
    check_config(config, num_devices=len(devices), num_processes=1)
    num_classes = num_seg_classes(config.data.source, num_classes=config.data.num_classes)
    mesh = sharding_lib.create_mesh(data=-1, fsdp=1, devices=devices)
    schedule = segment_lib.lr_schedule(config)
    spec = segment_lib.model_spec(config, num_classes)
    tx = segment_lib.create_tx(config, nnx.state(nnx.eval_shape(spec.build), nnx.Param), schedule)

    def init():
        return TrainState.create(spec.build(make_rngs(config.seed)), tx, rng_seed=config.seed + 1)

    if args.compile_only:  # shapes and shardings alone: nothing is allocated
        abstract = jax.eval_shape(init)
        state_shardings = sharding_lib.state_shardings(abstract, mesh)
        state = sharding_lib.abstract_with_shardings(abstract, state_shardings)
    else:
        state, state_shardings = sharding_lib.create_sharded(init, mesh)
    graphdef = nnx.split(nnx.eval_shape(spec.build), nnx.Param, ...)[0]
    def jitted_step():
        step_fn = make_train_step(graphdef, segment_lib.make_loss_fn(config.aux_weight), tx,
                                  schedule)
        return compile_step(step_fn, state_shardings, mesh)

    train_step = jitted_step()

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

    batch_sharding = sharding_lib.batch_sharding(mesh)
    make_batch = jax.jit(make_batch, out_shardings=batch_sharding)
    if args.compile_only:
        batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
            jax.eval_shape(make_batch, jax.random.PRNGKey(1)))
    else:
        batch = make_batch(jax.random.PRNGKey(1))
        jax.block_until_ready((state, batch))

    CompileCounter.install()
    compiles_before, seconds_before = CompileCounter.count, CompileCounter.seconds
    start = time.perf_counter()
    lowered = train_step.lower(state, batch)
    compiled = lowered.compile()
    compile_wall_s = time.perf_counter() - start
    # XLA's count of the program as lowered (all devices' work, before partitioning): after
    # compilation a GPU's products are cuBLAS / cuDNN calls, which the compiled count may leave
    # out or report as -1 (jax issues 16008, 22249).
    flops = step_flops(lowered)
    if jax.default_backend() == "cpu" and convolution.PER_TAP_KERNEL_GRAD:
        # The CPU's per-tap convolution kernel gradients run in a loop, whose body XLA's cost
        # analysis counts once: count the same step with autodiff's gradients (the same
        # products), lowered only (its count is within 0.02% of the compiled one's).
        convolution.PER_TAP_KERNEL_GRAD = False
        try:
            flops = step_flops(jitted_step().lower(state, batch))
        finally:
            convolution.PER_TAP_KERNEL_GRAD = True
    if args.compile_only:
        return {"framework": ("jax" + ("" if config.data.device_photometric
                                       else ", no photometric") + ", compile only"),
                "model": model_name(config),
                "config": args.config, "device": f"{len(devices)} x {devices[0].device_kind}",
                "dtype": config.model.dtype, "image_size": size, "batch": batch_size,
                "num_classes": num_classes, "compile_wall_s": compile_wall_s,
                "compiled_memory_gib": compiled_memory_gib(compiled),
                "memory_plan_gib": memory_plan_gib(compiled),
                "params": tree_size(state.params),
                "xla_tflop_per_step": flops / 1e12 if flops else None}
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
        "framework": "jax" + ("" if config.data.device_photometric else ", no photometric"),
        "model": model_name(config),
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
        "compiled_memory_gib": compiled_memory_gib(compiled),
        "params": tree_size(live["state"].params),
        "loss": float(live["metrics"]["loss"]),
        "xla_tflop_per_step": flops / 1e12 if flops else None,
        "region_seconds": regions,
    }
    add_utilisation(row, devices[0].device_kind, len(devices), args.peak_tflops)
    return row


def model_name(config) -> str:
    return f"{config.model.variant} + UPerNet ({config.model.channels} ch)"


def add_utilisation(row: dict[str, Any], device_kind: str, num_devices: int,
                    peak_override: float) -> None:
    """TFLOP/s from row["xla_tflop_per_step"] and images/s; MFU over the devices' peak."""
    flops = row["xla_tflop_per_step"]
    peak = peak_tflops(device_kind, row["dtype"].split()[0], peak_override)
    tflops = flops * row["images_per_s"] / row["batch"] if flops else None
    row.update(tflops=tflops, peak_tflops_per_device=peak,
               mfu=tflops / (peak * num_devices) if tflops and peak else None)


# --------------------------------------------------------------------------- PyTorch
def check_torch_row(config) -> None:
    """What the torch row needs of `config`, checked before anything runs (SystemExit)."""
    dims = core_config.encoder_dims(config.model)
    if config.model.channels != dims["embed_dim"]:
        raise SystemExit(f"the torch row needs model.channels == the backbone width "
                         f"({config.model.channels} != {dims['embed_dim']}): transformers' "
                         "UperHead uses hidden_size; drop torch from --frameworks")
    if dims["depth"] < 3:
        raise SystemExit(f"the torch row needs depth >= 3 (transformers takes 4 distinct "
                         f"feature blocks), got {dims['depth']}; drop torch from --frameworks")


def torch_segmenter(config, num_classes: int, attention: str = "eager"):
    """transformers' BeitForSemanticSegmentation sized and set up as `config`'s MAESegmenter
    (mmseg's ViT + UPerNet: BEiT's segmentation model), in training mode."""
    from transformers import BeitConfig, BeitForSemanticSegmentation

    check_torch_row(config)
    model, dims = config.model, core_config.encoder_dims(config.model)
    beit = BeitConfig(
        hidden_size=dims["embed_dim"], num_hidden_layers=dims["depth"],
        num_attention_heads=dims["num_heads"], intermediate_size=4 * dims["embed_dim"],
        patch_size=dims["patch_size"], image_size=model.image_size, layer_norm_eps=1e-6,
        hidden_act="gelu", use_absolute_position_embeddings=True,
        use_relative_position_bias=model.relative_position_bias,
        layer_scale_init_value=model.layer_scale_init, drop_path_rate=model.drop_path_rate,
        out_indices=torch_out_indices(model.out_indices, dims["depth"]), pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True, auxiliary_loss_weight=config.aux_weight,
        auxiliary_channels=model.aux_channels, auxiliary_num_convs=1,
        auxiliary_concat_input=False, semantic_loss_ignore_index=255, num_labels=num_classes,
    )
    beit._attn_implementation = attention
    return BeitForSemanticSegmentation(beit).train()


def torch_out_indices(out_indices, depth: int) -> list[int]:
    """transformers' out_indices for our 0-based feature blocks (depth >= 3).

    transformers 5 feeds the neck hidden_states[i - 1] of (embeddings, block 0, .., block
    depth - 1) and accepts 4 distinct i in 0 .. depth, so block b is i = b + 2 and the last
    block is out of its reach; then the last four it accepts stand in. Which blocks feed the
    neck does not change the step's work (every block runs, every feature map has one shape).
    """
    wanted = [b + 2 for b in out_indices]
    if len(set(wanted)) == 4 and max(wanted) <= depth:
        return wanted
    return list(range(depth - 3, depth + 1))


def torch_layer_decay_groups(net, config) -> list[dict[str, Any]]:
    """mmseg's LayerDecayOptimizerConstructor over transformers' names: embeddings layer 0,
    block i layer i + 1, neck and heads depth + 1; lr scale decay**(depth + 1 - layer); no
    weight decay for 1-D parameters and biases (as `segment_lib.create_tx`)."""
    depth = core_config.encoder_dims(config.model)["depth"]
    groups: dict[tuple[int, bool], list] = {}
    for name, param in net.named_parameters():
        if name.startswith("beit.embeddings."):
            layer = 0
        elif name.startswith("beit.layers."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = depth + 1
        decay = not (param.ndim == 1 or name.endswith(".bias"))
        groups.setdefault((layer, decay), []).append(param)
    return [{"params": params, "weight_decay": config.weight_decay if decay else 0.0,
             "lr": config.lr * config.layer_decay ** (depth + 1 - layer)}
            for (layer, decay), params in sorted(groups.items())]


def bench_torch(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    config = load_config(args)
    num_classes = num_seg_classes(config.data.source, num_classes=config.data.num_classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    amp = on_gpu and config.model.dtype == "bfloat16"  # mmseg: fp16 / bf16 autocast on CUDA
    torch.backends.cudnn.benchmark = True  # as mmseg's configs
    torch.manual_seed(config.seed)
    net = torch_segmenter(config, num_classes, args.torch_attention).to(device)
    optimizer = torch.optim.AdamW(torch_layer_decay_groups(net, config), lr=config.lr,
                                  betas=(config.b1, config.b2))
    size, batch_size = config.model.image_size, config.batch_size
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch_size, size, size), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = 255
    labels = labels.to(device)

    regions, first_step_s, loss = time_torch_step(
        lambda: net(pixel_values=images, labels=labels).loss, optimizer, args, device, amp)
    row = {
        "framework": f"torch (transformers BEiT, {args.torch_attention})",
        "model": model_name(config),
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if on_gpu else
        f"cpu ({torch.get_num_threads()} threads)",
        "dtype": "bfloat16 (autocast)" if amp else "float32",
        "image_size": size,
        "batch": batch_size,
        "num_classes": num_classes,
        **summarize(regions, args.steps, batch_size),
        "compile_s": None,  # eager
        "compile_wall_s": None,
        "compiles": None,
        "first_step_s": first_step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
        "params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "loss": loss,
        "xla_tflop_per_step": None,
        "region_seconds": regions,
    }
    net = optimizer = images = labels = None
    if on_gpu:
        torch.cuda.empty_cache()  # hand the memory back before JAX runs
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table; `/ torch` is each row's median ms/step over the PyTorch row's."""
    torch_ms = next((r["ms_per_step_median"] for r in rows
                     if r["framework"].startswith("torch")), None)

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    header = ("framework", "model", "device", "dtype", "crop", "batch", "ms/step med",
              "ms/step mean", "/ torch", "images/s", "compile s", "peak GiB", "XLA TFLOP/step",
              "TFLOP/s", "MFU")
    lines = [header, ("---",) * len(header)]
    for r in rows:
        ratio = r["ms_per_step_median"] / torch_ms if torch_ms else None
        lines.append((r["framework"], r["model"], r["device"], r["dtype"], str(r["image_size"]),
                      str(r["batch"]), cell(r["ms_per_step_median"], ".1f"),
                      cell(r["ms_per_step_mean"], ".1f"), cell(ratio, ".2f"),
                      cell(r["images_per_s"], ".2f"), cell(r["compile_s"], ".1f"),
                      cell(r["peak_memory_gib"], ".2f"), cell(r["xla_tflop_per_step"], ".4g"),
                      cell(r["tflops"], ".3g"), cell(r["mfu"], ".1%")))
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def print_compile_only(row: dict[str, Any], machine: dict[str, Any],
                       args: argparse.Namespace) -> dict[str, Any]:
    """`--compile_only`'s table (XLA's plan, nothing run) and report."""
    plan = row["memory_plan_gib"] or {}
    header = ("model", "device", "dtype", "crop", "batch", "compile s", "XLA plan GiB",
              "arguments", "outputs", "temporaries", "donated", "XLA TFLOP/step")
    cells = (row["model"], row["device"], row["dtype"], str(row["image_size"]),
             str(row["batch"]), f"{row['compile_wall_s']:.1f}",
             *("-" if value is None else f"{value:.2f}"
               for value in (row["compiled_memory_gib"], *(plan.get(kind) for kind in (
                   "arguments", "outputs", "temporaries", "donated")))),
             "-" if row["xla_tflop_per_step"] is None else f"{row['xla_tflop_per_step']:.4g}")
    print("\n".join("| " + " | ".join(line) + " |"
                    for line in (header, ("---",) * len(header), cells)))
    print(f"Compiled only, nothing run: XLA's plan for one device = arguments + outputs + "
          f"temporaries - donated; {row['params'] / 1e6:.3f}M trainable parameters, "
          f"{row['num_classes']} classes."
          + (" On a CPU, XLA holds the bfloat16 operands of products as float32 copies (the "
             "attention probabilities, for one), so a bfloat16 plan here is not a GPU's."
             if jax.default_backend() == "cpu" else ""))
    return write_json({"machine": machine, "settings": vars(args), "results": [row]},
                      args.out_json)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns {"machine", "settings", "results": [row per framework]}."""
    args = parse_args(argv)
    if "torch" in args.frameworks:
        check_torch_row(load_config(args))
    machine = machine_info()
    print("Machine:", ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("Load average (1, 5, 15 min):", os.getloadavg())
    if args.compile_only:
        return print_compile_only(bench_jax(args), machine, args)
    benches = {"jax": bench_jax, "torch": bench_torch}
    each = args.processes == "each" or (args.processes == "auto"
                                         and jax.default_backend() == "cpu")
    if each and len(args.frameworks) > 1:
        rows = [row for name in args.frameworks
                for row in in_own_process(name, argv, script=os.path.abspath(__file__))]
    else:  # PyTorch first: its cached memory is released afterwards, JAX's is not
        results, errors = run_guarded({name: functools.partial(benches[name], args)
                                       for name in sorted(args.frameworks, reverse=True)})
        rows = [results[name] for name in args.frameworks if name in results]
        if errors:  # the rows that ran, then exit status 1
            write_json({"machine": machine, "settings": vars(args), "results": rows,
                        "errors": errors}, args.out_json)
            raise SystemExit(f"Failed: {', '.join(errors)} (the report keeps the other rows)")
    xla_flops = next((r["xla_tflop_per_step"] for r in rows
                      if r["framework"].startswith("jax")), None)
    for row in rows:
        if not all(math.isfinite(t) and t > 0 for t in row["region_seconds"]):
            raise RuntimeError(f"{row['framework']}: non-positive timing {row['region_seconds']}")
        if row["framework"].startswith("torch"):  # the same architecture: XLA's count
            row["xla_tflop_per_step"] = xla_flops
            add_utilisation(row, row["device"], 1, args.peak_tflops)
    print(format_table(rows))
    print("Load average after (1, 5, 15 min):", os.getloadavg())
    for row in rows:
        print(f"{row['framework']}: {row['params'] / 1e6:.3f}M trainable parameters, "
              f"{row['num_classes']} classes, final loss {row['loss']:.4f}"
              + (f"; {row['compiles']} XLA compilation(s) from compiling the step to its last "
                 "timed run" if row["compiles"] is not None else ""))
    print(f"{args.warmup} warmup + {args.repeats} x {args.steps} timed steps. TFLOP/s: XLA's "
          "FLOP count of our step as lowered (forward, backward, AdamW) x steps/s; MFU over the "
          "device's peak" + (f" ({rows[0]['peak_tflops_per_device']} TFLOP/s)."
                             if rows[0]["mfu"] is not None else " (unknown here: --peak_tflops)."))
    report = {"machine": machine, "settings": vars(args), "results": rows}
    return write_json(report, args.out_json)


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()
    main()
