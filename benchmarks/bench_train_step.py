"""MAE pretraining step, JAX (mae_jax, the step train.py runs) vs the official PyTorch MAE.

Both sides train the same architecture on the same synthetic batch, generated on the device:
JAX runs the pretraining step (`mae_jax.core.step.make_train_step` with MAE's loss) jitted by
`compile_step` (explicit shardings, donated state, AdamW from `mae_jax.pretrain.lib.create_tx`);
PyTorch runs `mae_jax.reference.torch_mae`
(a plain-torch copy of the official `models_mae.py`) with forward + backward + AdamW step, under
bf16 autocast on CUDA when --dtype=bfloat16 (float32 on CPU, as the official code does;
--torch_cpu_autocast: CPU bf16 autocast too).

    python benchmarks/bench_train_step.py --image_size 64 --batch_size 8      # CPU, seconds
    python benchmarks/bench_train_step.py --dtype bfloat16 --batch_size 256 \
        --model vit_base_patch16 --out_json vitb.json                          # one GPU
    python benchmarks/bench_train_step.py --model vit_base_patch16 --image_size 112 \
        --batch_size 8 --encoder_all_tokens              # + the paper's masking speed-up

Each row reports model TFLOP/s (3 x the forward matmul FLOPs, attention included, norms and
elementwise ops not) and MFU over the device's peak: NVIDIA's dense bfloat16 peaks for known
GPUs (`PEAK_TFLOPS`; H200: 989.4 TFLOP/s), or `--peak_tflops` per device.

`--encoder_all_tokens` adds a JAX row whose encoder runs on all L patches (the cost of the
paper's "encoder w/ [M]": same decoder and loss, no token dropped) and prints its time over the
masked step's next to the ratio of their forward matmul FLOPs.

Timing: each of `--repeats` timed regions runs `--steps` steps and blocks only at its end
(jax.block_until_ready / torch.cuda.synchronize); ms/step median and mean are over regions.

On a CPU each framework runs in a fresh process of its own (`--processes auto`): measured in
one process after PyTorch's step, the JAX step of ViT-Tiny/16 at 224 px, batch 32, ran 17%
slower (12.4 vs 10.6 s on one core) than in a process of its own. On a GPU both share one
process, PyTorch first (its cached memory is released before JAX allocates).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

# JAX must not grab 75% of the GPU up front: PyTorch shares the device in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mae_jax.core import config as core_config  # noqa: E402
from mae_jax.core import hostmem, optim  # noqa: E402
from mae_jax.core import sharding as sharding_lib  # noqa: E402
from mae_jax.core.state import TrainState, tree_size  # noqa: E402
from mae_jax.core.step import compile_step, make_train_step  # noqa: E402
from mae_jax.data.constants import normalize_uint8  # noqa: E402
from mae_jax.models.layers import make_rngs  # noqa: E402
from mae_jax.models.mae import num_visible, removed_patches  # noqa: E402
from mae_jax.models.registry import VARIANTS  # noqa: E402
from mae_jax.pretrain import config as pretrain_config  # noqa: E402
from mae_jax.pretrain import lib as pretrain_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_summary  # noqa: E402  (json and gzip only)

FRAMEWORKS = ("jax", "torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16", choices=sorted(VARIANTS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32, help="Global images per step.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--torch_cpu_autocast", action="store_true",
                        help="With --dtype bfloat16 on a CPU: PyTorch's step under CPU bf16 "
                             "autocast (the official code autocasts on CUDA only, so by "
                             "default its CPU row stays float32).")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per region.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed regions.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps after compile.")
    parser.add_argument("--frameworks", default="jax,torch", help="Comma list of jax, torch.")
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    # Model overrides (0 = not overridden: the variant's / the paper's decoder); tests shrink.
    for name in (*core_config.ENCODER_FIELDS, "decoder_depth", "decoder_width"):
        parser.add_argument(f"--{name}", type=int, default=0)  # decoder heads: width / 32
    parser.add_argument("--encoder_all_tokens", action="store_true",
                        help="Also time JAX with the encoder on all patches (masking ablation).")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="Peak dense TFLOP/s of one device in --dtype, for MFU (0: known "
                             "GPUs in bfloat16, see PEAK_TFLOPS; else no MFU).")
    parser.add_argument("--cpu_devices", type=int, default=0,
                        help="train.py's mesh.cpu_devices: on a CPU, JAX's backend as N "
                             "devices with the batch split over them (0: one device).")
    parser.add_argument("--processes", default="auto", choices=("auto", "one", "each"),
                        help="each: every framework in a fresh process of its own; one: all "
                             "in this process; auto: each on a CPU, one on a GPU.")
    parser.add_argument("--profile_dir", default="",
                        help="After the timed regions, trace --profile_steps more JAX steps "
                             "(masked row) with jax.profiler into this folder and report their "
                             "ops (benchmarks/trace_summary.py).")
    parser.add_argument("--profile_steps", type=int, default=3)
    parser.add_argument("--out_json", default="")
    args = parser.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(args.frameworks) - set(FRAMEWORKS)
    if unknown or not args.frameworks:
        parser.error(f"--frameworks must list some of {FRAMEWORKS}, got {sorted(unknown)}")
    if args.cpu_devices < 0:
        parser.error(f"--cpu_devices {args.cpu_devices}: must be >= 0 (0: JAX's one CPU device)")
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --batch_size must be >= 1, --warmup >= 0")
    return args


def build_config(args: argparse.Namespace):
    """train.py's config (the official recipe) with this run's model and batch."""
    config = pretrain_config.defaults()
    config.model.variant = args.model
    config.model.image_size = args.image_size
    config.model.dtype = args.dtype
    for name in core_config.ENCODER_FIELDS:
        if getattr(args, name):
            config.model[name] = getattr(args, name)
    decoder = {"decoder_depth": args.decoder_depth, "decoder_width": args.decoder_width}
    pretrain_config.apply_arg(
        config, ",".join(f"{k}={v}" for k, v in decoder.items() if v)
    )
    config.mask_ratio = args.mask_ratio
    config.batch_size = args.batch_size
    config.total_steps = 1 + args.warmup + args.steps * args.repeats
    config.warmup_steps = 1  # The step also evaluates the lr schedule, as in training.
    config.mesh.cpu_devices = args.cpu_devices
    return config


def model_dims(config) -> dict[str, int]:
    """Encoder and decoder sizes after overrides, shared by both frameworks."""
    return core_config.encoder_dims(config.model) | {name: config.model[name]
                   for name in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")}


class CompileCounter:
    """Counts XLA backend compilations in this process (a real recompile shows up here)."""

    count = 0
    seconds = 0.0
    _registered = False

    @classmethod
    def install(cls) -> None:
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._registered = True

    @classmethod
    def _listen(cls, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            cls.count += 1
            cls.seconds += duration


def peak_memory_gib(devices) -> float | None:
    """The largest peak of bytes in use over `devices` (GiB); None where the backend does not
    report it (CPU)."""
    stats = [device.memory_stats() or {} for device in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) / 2**30 if peaks else None


def memory_plan_gib(compiled) -> dict[str, float] | None:
    """XLA's plan for one device by kind (GiB): arguments, outputs, temporaries and the
    donated (aliased) bytes the outputs reuse; None where the backend does not report it."""
    try:
        stats = compiled.memory_analysis()
        sizes = (stats.argument_size_in_bytes, stats.output_size_in_bytes,
                 stats.temp_size_in_bytes, stats.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - optional: some backends do not implement it
        return None
    return dict(zip(("arguments", "outputs", "temporaries", "donated"),
                    (size / 2**30 for size in sizes), strict=True))


def compiled_memory_gib(compiled) -> float | None:
    """What XLA planned for one device when it compiled the step (GiB): arguments + outputs
    + temporaries - donated (aliased) bytes. Unlike the allocator's peak it excludes what else
    the process holds (e.g. the compiler's autotuning scratch); None where not reported."""
    plan = memory_plan_gib(compiled)
    if plan is None:
        return None
    total = plan["arguments"] + plan["outputs"] + plan["temporaries"] - plan["donated"]
    return total if total > 0 else None


def time_regions(step, finish, args: argparse.Namespace) -> list[float]:
    """`--warmup` untimed steps, then `--repeats` regions of `--steps` steps; step() launches
    one step, finish() blocks until the device is done. Returns the regions' seconds."""
    for _ in range(args.warmup):
        step()
    finish()
    regions = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        finish()
        regions.append(time.perf_counter() - start)
    return regions


def summarize(region_seconds: list[float], steps: int, batch: int) -> dict[str, float]:
    per_step = [1000 * s / steps for s in region_seconds]
    return {
        "ms_per_step_median": statistics.median(per_step),
        "ms_per_step_mean": statistics.fmean(per_step),
        "images_per_s": batch * steps * len(region_seconds) / sum(region_seconds),
    }


# --------------------------------------------------------------------------- Masking ablation
def all_tokens_loss_fn(mask_ratio: float):
    """MAE's loss with the encoder on all L patches (the paper's "encoder w/ [M]" cost).

    The same masks pick the patches the loss is taken on; the decoder gets all L encoded
    tokens in place (ids_restore = identity, so no mask token is inserted).
    """

    def loss_fn(model, batch, rng):
        images = normalize_uint8(batch["image"])
        tokens = model.encoder.embed(images)
        noise = model.make_noise(rng, len(images))
        removed = removed_patches(noise, mask_ratio)
        latent, _ = model.encoder.encode(tokens)
        in_place = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), noise.shape)
        return model.loss_on(images, latent, in_place, removed), {}  # as MAE.loss

    return loss_fn


def forward_matmul_flops(dims: dict[str, int], image_size: int, encoder_tokens: int,
                         decoder_rows: int | None = None) -> int:
    """Forward matmul FLOPs of the MAE (patch embed, blocks incl. attention, decoder embed and
    head) with `encoder_tokens` patches in the encoder; norms and elementwise ops left out.

    decoder_rows: the tokens the decoder's last block and head compute (`MAE.loss`: the removed
    patches; default all 1 + L, as the official model and `MAE.__call__`)."""
    patch, length = dims["patch_size"], (image_size // dims["patch_size"]) ** 2
    tokens = 1 + length
    rows = tokens if decoder_rows is None else decoder_rows

    def blocks(depth, tokens, width, rows=None):  # qkv + proj + MLP (ratio 4), QK^T and PV
        rows = tokens if rows is None else rows  # queries; keys and values: all tokens
        return depth * (3 * tokens * width**2 + 9 * rows * width**2 + 2 * rows * tokens * width)

    width, decoder_width, depth = dims["embed_dim"], dims["decoder_embed_dim"], dims[
        "decoder_depth"]
    macs = (length * 3 * patch**2 * width
            + blocks(dims["depth"], 1 + encoder_tokens, width)
            + (1 + encoder_tokens) * width * decoder_width
            + blocks(max(depth - 1, 0), tokens, decoder_width)
            + (blocks(1, tokens, decoder_width, rows) if depth else 0)
            + rows * decoder_width * 3 * patch**2)
    return 2 * macs


# Dense bfloat16 tensor-core peaks (TFLOP/s per device, no sparsity) from NVIDIA's data sheets,
# matched against the device name. float32 and unlisted devices need --peak_tflops.
# Dense bf16 per device, by a substring of its device_kind; the first match wins, so the H100
# PCIe (756) and NVL (835) come before the SXM's "NVIDIA H100 80GB HBM3".
PEAK_TFLOPS = {"bfloat16": {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4,
                            "A100": 312.0, "L40S": 362.05}}


def peak_tflops(device_name: str, dtype: str, override: float = 0.0) -> float | None:
    """One device's peak TFLOP/s for MFU: `override` when given, else the table, else None."""
    if override:
        return override
    return next((peak for key, peak in PEAK_TFLOPS.get(dtype, {}).items()
                 if key in device_name), None)


def add_utilisation(row: dict[str, Any], train_flops_per_image: float, devices: int,
                    peak: float | None) -> dict[str, Any]:
    """Adds model TFLOP/s (3 x the forward matmul FLOPs per image: forward + backward, the
    usual MFU convention; norms and elementwise ops not counted) and MFU over `devices`."""
    achieved = train_flops_per_image * row["images_per_s"] / 1e12
    row.update(train_gflop_per_image=train_flops_per_image / 1e9, model_tflops=achieved,
               peak_tflops_per_device=peak, mfu=achieved / (peak * devices) if peak else None)
    return row


# --------------------------------------------------------------------------- JAX
def bench_jax(args: argparse.Namespace, *, encoder_all_tokens: bool = False) -> dict[str, Any]:
    config = build_config(args)
    devices = jax.devices()
    pretrain_config.check_config(config, num_devices=len(devices), num_processes=1)
    mesh = sharding_lib.create_mesh(data=-1, fsdp=1, devices=devices)
    schedule = optim.warmup_cosine_schedule(
        peak_lr=pretrain_lib.peak_learning_rate(config), warmup_steps=config.warmup_steps,
        total_steps=config.total_steps,
    )
    tx = pretrain_lib.create_tx(config, schedule)
    spec = pretrain_lib.model_spec(config.model)
    state, state_shardings = sharding_lib.create_sharded(
        lambda: TrainState.create(spec.build(make_rngs(config.seed)), tx,
                                  rng_seed=config.seed + 1),
        mesh,
    )
    graphdef = nnx.split(nnx.eval_shape(spec.build), nnx.Param, ...)[0]
    make_loss_fn = all_tokens_loss_fn if encoder_all_tokens else pretrain_lib.make_loss_fn
    step_fn = make_train_step(graphdef, make_loss_fn(config.mask_ratio), tx, schedule)
    train_step = compile_step(step_fn, state_shardings, mesh)

    shape = (args.batch_size, args.image_size, args.image_size, 3)
    make_images = jax.jit(
        lambda key: jax.random.randint(key, shape, 0, 256).astype(jnp.uint8),  # as the input gives
        out_shardings=sharding_lib.batch_sharding(mesh),
    )
    batch = {"image": make_images(jax.random.PRNGKey(1))}
    jax.block_until_ready((state, batch))

    CompileCounter.install()
    compiles_before, compile_seconds_before = CompileCounter.count, CompileCounter.seconds
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(train_step(state, batch))
    first_call_s = time.perf_counter() - start
    compiles = CompileCounter.count - compiles_before
    compile_s = CompileCounter.seconds - compile_seconds_before

    live = {"state": state, "metrics": metrics}  # the step donates the state it is given
    del state

    def step():
        live["state"], live["metrics"] = train_step(live["state"], batch)

    regions = time_regions(step, lambda: jax.block_until_ready(live), args)
    profile = None
    if args.profile_dir and not encoder_all_tokens:
        try:  # after the timing: a profiler that fails (no CUPTI) costs the trace, not the row
            jax.profiler.start_trace(args.profile_dir, create_perfetto_trace=True)
            try:
                for _ in range(args.profile_steps):
                    step()
                jax.block_until_ready(live)
            finally:  # never leave the profiler running into the next row
                jax.profiler.stop_trace()
            profile = trace_summary.summarize(args.profile_dir, steps=args.profile_steps)
        except Exception as error:  # noqa: BLE001
            print(f"Profile failed: {type(error).__name__}: {error}")
            profile = {"error": f"{type(error).__name__}: {error}"}
    state, metrics = live.pop("state"), live.pop("metrics")
    recompiles = CompileCounter.count - compiles_before - compiles
    cache_size = train_step._cache_size() if hasattr(train_step, "_cache_size") else None
    if recompiles or cache_size not in (None, 1):
        raise RuntimeError(f"The JAX step recompiled ({recompiles} compiles, cache {cache_size}).")

    row = {
        "framework": "jax, encoder on all tokens" if encoder_all_tokens else "jax",
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "dtype": args.dtype,
        "batch": args.batch_size,
        **summarize(regions, args.steps, args.batch_size),
        "first_step_s": first_call_s,
        "compile_s": compile_s,
        "compiles_first_call": compiles,
        "compiles_after_first_call": recompiles,
        "jit_cache_size": cache_size,
        "peak_memory_gib": peak_memory_gib(mesh.devices.flat),
        "params": tree_size(state.params),
        "loss": float(metrics["loss"]),
        "region_seconds": regions,
    }
    if profile is not None:
        row["profile"] = profile
    return row


# --------------------------------------------------------------------------- PyTorch
def time_torch_step(forward, optimizer, args: argparse.Namespace, device, amp: bool
                    ) -> tuple[list[float], float, float]:
    """Times PyTorch steps: forward() -> loss (under bf16 autocast on CUDA when `amp`),
    backward, optimizer step, zero_grad; the first step alone, then `time_regions`. Resets
    the CUDA peak-memory counter first. Returns (region seconds, first step s, last loss)."""
    import torch

    on_gpu = device.type == "cuda"

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    last = {"loss": step()}
    sync()
    first_step_s = time.perf_counter() - start
    regions = time_regions(lambda: last.update(loss=step()), sync, args)
    return regions, first_step_s, float(last["loss"].detach())


def bench_torch(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mae_jax.reference.torch_mae import MaskedAutoencoderViT

    config = build_config(args)
    dims = model_dims(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    # The official recipe: bf16/fp16 autocast is a CUDA-only option (--amp); CPU stays float32
    # unless --torch_cpu_autocast (a CPU with bf16 matrix units: torch's oneDNN uses them).
    amp = args.dtype == "bfloat16" and (on_gpu or args.torch_cpu_autocast)
    torch.backends.cudnn.benchmark = True  # As the official main_pretrain.py.
    torch.manual_seed(config.seed)
    model = MaskedAutoencoderViT(
        img_size=args.image_size, norm_pix_loss=config.model.norm_pix_loss, **dims
    ).to(device)
    # Official optim_factory.add_weight_decay: no decay for biases and 1-D parameters.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0},
         {"params": decay, "weight_decay": config.weight_decay}],
        lr=pretrain_lib.peak_learning_rate(config), betas=(config.b1, config.b2),
    )
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)

    regions, first_step_s, loss = time_torch_step(
        lambda: model(images, mask_ratio=config.mask_ratio)[0], optimizer, args, device, amp)
    row = {
        "framework": "torch",
        "device": torch.cuda.get_device_name(device) if on_gpu else
        f"cpu ({torch.get_num_threads()} threads)",
        "dtype": "bfloat16 (autocast)" if amp else "float32",
        "batch": args.batch_size,
        **summarize(regions, args.steps, args.batch_size),
        "first_step_s": first_step_s,
        "compile_s": None,  # Eager: nothing to compile.
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loss": loss,
        "region_seconds": regions,
    }
    model = optimizer = images = None  # Drop the last references (step() shares them).
    if on_gpu:
        torch.cuda.empty_cache()  # Hand the memory back before JAX runs.
    return row


# --------------------------------------------------------------------------- Report
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_devices": [d.device_kind for d in jax.devices()],
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table; `/ torch` is each row's median ms/step over the PyTorch row's."""
    torch_ms = next((r["ms_per_step_median"] for r in rows if r["framework"] == "torch"), None)

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    header = ("framework", "device", "dtype", "batch", "ms/step med", "ms/step mean",
              "/ torch", "images/s", "TFLOP/s", "MFU", "compile s", "first step s", "peak GiB")
    lines = [header, ("---",) * len(header)]
    for r in rows:
        ratio = r["ms_per_step_median"] / torch_ms if torch_ms else None
        lines.append((r["framework"], r["device"], r["dtype"], str(r["batch"]),
                      cell(r["ms_per_step_median"], ".1f"), cell(r["ms_per_step_mean"], ".1f"),
                      cell(ratio, ".2f"), cell(r["images_per_s"], ".1f"),
                      cell(r.get("model_tflops"), ".3g"), cell(r.get("mfu"), ".1%"),
                      cell(r["compile_s"], ".2f"), cell(r["first_step_s"], ".2f"),
                      cell(r["peak_memory_gib"], ".2f")))
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def masking_ablation(rows: list[dict[str, Any]], args, dims) -> dict[str, float]:
    """Time and forward-FLOP ratios of the all-tokens encoder over the masked one."""
    by_name = {r["framework"]: r for r in rows}
    length = (args.image_size // dims["patch_size"]) ** 2
    visible = num_visible(length, args.mask_ratio)
    flops = {k: forward_matmul_flops(dims, args.image_size, k, decoder_rows=length - visible)
             for k in (visible, length)}
    return {
        "time_ratio": by_name["jax, encoder on all tokens"]["ms_per_step_median"]
        / by_name["jax"]["ms_per_step_median"],
        "flop_ratio": flops[length] / flops[visible],
        "forward_gflops_masked": flops[visible] / 1e9,
        "forward_gflops_all_tokens": flops[length] / 1e9,
    }


def utilisation(row: dict[str, Any], args: argparse.Namespace, dims: dict) -> dict[str, Any]:
    """`add_utilisation` of one row: 3 x the forward matmul FLOPs of the step it ran."""
    length = (args.image_size // dims["patch_size"]) ** 2
    visible = num_visible(length, args.mask_ratio)
    encoder_tokens = length if row["framework"] == "jax, encoder on all tokens" else visible
    # Ours computes the decoder's last block for the removed patches only (MAE.loss).
    decoder_rows = length - visible if row["framework"].startswith("jax") else None
    return add_utilisation(
        row, 3 * forward_matmul_flops(dims, args.image_size, encoder_tokens, decoder_rows),
        devices=len(jax.devices()) if row["framework"].startswith("jax") else 1,
        peak=peak_tflops(row["device"], args.dtype, args.peak_tflops),
    )


def run_guarded(benches: dict[str, Any], after_each=None
                ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Calls each of `benches` ({name: no-argument function returning a row}) in turn. One that
    raises (an out-of-memory, a kernel the GPU rejects) leaves its error and traceback, and the
    others' rows are kept: a one-shot GPU run loses one row, not the report. Returns
    ({name: row}, {name: error}). after_each(rows, errors): called after each, e.g. to write
    the report so far (a run killed at its time limit keeps the rows it finished)."""
    rows, errors = {}, {}
    for name, bench in benches.items():
        try:
            rows[name] = bench()
        except Exception as error:  # noqa: BLE001 - reported, and the run's exit status is 1
            traceback.print_exc()
            errors[name] = f"{type(error).__name__}: {error}"[:2000]
            print(f"{name}: FAILED ({errors[name][:300]}); the other rows are kept", flush=True)
        if after_each is not None:
            after_each(rows, errors)
    return rows, errors


def write_json(report: dict[str, Any], path: str, *, quiet: bool = False) -> dict[str, Any]:
    """Writes `report` to `path` as JSON ('' writes nothing), atomically; returns it."""
    if path:
        with open(path + ".tmp", "w") as handle:
            json.dump(report, handle, indent=2)
        os.replace(path + ".tmp", path)
        if not quiet:
            print("Wrote", path)
    return report


def in_own_process(framework: str, argv: list[str] | None, script: str = __file__
                   ) -> list[dict[str, Any]]:
    """`script`'s rows for one framework (its report's "results"), from a fresh Python process
    of its own; `script` takes --frameworks, --processes and --out_json."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.json")
        args = list(sys.argv[1:] if argv is None else argv)
        if framework == "torch" and "--encoder_all_tokens" in args:
            args.remove("--encoder_all_tokens")
        command = [sys.executable, os.path.abspath(script), *args, "--frameworks", framework,
                   "--processes", "one", "--out_json", out]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"The {framework} process failed ({done.returncode}):\n"
                               + done.stdout[-2000:] + done.stderr[-4000:])
        with open(out) as handle:
            return json.load(handle)["results"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns {"machine", "settings", "results": [row per framework],
    "masking_ablation" (with --encoder_all_tokens)}."""
    args = parse_args(argv)
    if args.encoder_all_tokens and "jax" not in args.frameworks:
        raise SystemExit("--encoder_all_tokens compares two JAX steps: include jax in --frameworks")
    config = build_config(args)
    try:
        core_config.apply_cpu_devices(config)  # before anything asks JAX for its devices
    except core_config.ConfigError as error:  # e.g. XLA_FLAGS also sets the device count
        raise SystemExit(f"--cpu_devices: {error}") from None
    dims = model_dims(config)
    settings = vars(args) | {"model_dims": dims}
    machine = machine_info()
    print("Machine:", ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("Load average (1, 5, 15 min):", os.getloadavg())
    print("Model:", args.model, dims, f"image {args.image_size},",
          f"mask ratio {args.mask_ratio}, {args.warmup} warmup + {args.repeats} x {args.steps} "
          "timed steps")
    benches = {"jax": bench_jax, "torch": bench_torch}
    each = args.processes == "each" or (args.processes == "auto"
                                         and jax.default_backend() == "cpu")
    if each and len(args.frameworks) + args.encoder_all_tokens > 1:
        rows, errors = [row for name in args.frameworks for row in in_own_process(name, argv)], {}
    else:
        # PyTorch first: its cached memory is released afterwards, JAX's is not.
        calls = {name: functools.partial(benches[name], args)
                 for name in sorted(args.frameworks, reverse=True)}
        if args.encoder_all_tokens:
            calls["jax, encoder on all tokens"] = functools.partial(
                bench_jax, args, encoder_all_tokens=True)

        def so_far(results, errors):  # the rows finished, should the entry be killed later
            done = [dict(row) for row in results.values()]
            for row in done:
                utilisation(row, args, dims)
            write_json({"machine": machine, "settings": settings, "results": done,
                        "errors": errors, "partial": True}, args.out_json, quiet=True)

        results, errors = run_guarded(calls, after_each=so_far if len(calls) > 1 else None)
        rows = [results[name] for name in [*args.frameworks, "jax, encoder on all tokens"]
                if name in results]
    if not rows:
        write_json({"machine": machine, "settings": settings, "results": [], "errors": errors},
                   args.out_json)
        raise SystemExit(f"Every row failed: {errors}")
    for row in rows:
        if not all(math.isfinite(t) and t > 0 for t in row["region_seconds"]):
            raise RuntimeError(f"{row['framework']}: non-positive timing {row['region_seconds']}")
        utilisation(row, args, dims)
    print(format_table(rows))
    for row in rows:  # printed here: a framework's own process keeps its output to itself
        if row.get("profile") and "error" in row["profile"]:
            print(f"{row['framework']}: no profile ({row['profile']['error']}).")
        elif row.get("profile"):
            print(trace_summary.format_summary(row["profile"], args.profile_steps))
    print(f"TFLOP/s: 3 x the forward matmul FLOPs ({rows[0]['train_gflop_per_image']:.3g} GFLOP "
          "per image for the masked step) x images/s. MFU: over the peak of "
          + (f"{args.peak_tflops} TFLOP/s per device (--peak_tflops)" if args.peak_tflops else
             f"the known {args.dtype} peaks {PEAK_TFLOPS.get(args.dtype, {})} (none: '-')"))
    print("Load average after (1, 5, 15 min):", os.getloadavg())
    for r in rows:
        if r["framework"].startswith("jax"):
            print(f"{r['framework']}: step compiled {r['compiles_first_call']} time(s) on the "
                  f"first call, {r['compiles_after_first_call']} time(s) after it (jit cache "
                  f"size {r['jit_cache_size']}): no recompilation.")
    print("Trainable parameters:", {r["framework"]: r["params"] for r in rows},
          "| final loss:", {r["framework"]: round(r["loss"], 4) for r in rows})
    report = {"machine": machine, "settings": settings, "results": rows}
    if errors:
        report["errors"] = errors
    if args.encoder_all_tokens and not {"jax", "jax, encoder on all tokens"} & set(errors):
        report["masking_ablation"] = ablation = masking_ablation(rows, args, dims)
        print(f"Encoder on all tokens / on visible tokens: {ablation['time_ratio']:.2f}x the "
              f"time, {ablation['flop_ratio']:.2f}x the forward matmul FLOPs "
              f"({ablation['forward_gflops_all_tokens']:.2f} / "
              f"{ablation['forward_gflops_masked']:.2f} GFLOP per image).")
    write_json(report, args.out_json)
    if errors:
        raise SystemExit(f"Failed: {', '.join(errors)} (the report keeps the other rows)")
    return report


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()
    main()
