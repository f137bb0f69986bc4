"""Config resolution and the checks every task shares, in one place.

A config names a model `variant` (a registry name) and may override its encoder dimensions
explicitly; an unset override (None) means "the variant's value", never a magic 0. Each config
says which entry point it is for (`config.task`), so running it with the wrong script is one
clear error. Problems are collected and reported together, before any data or compile work.
"""

from __future__ import annotations

import importlib
import os

import ml_collections
from ml_collections import config_dict

from mae_jax.core.errors import BadInputError
from mae_jax.models.variants import VARIANTS, get_variant

# No JAX at import: configs/*.py load this while the command line is parsed (mae_jax.core.entry).
DTYPES = ("float32", "bfloat16", "float16")
ENCODER_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads")
ON_DEVICE_MODES = ("auto", "always", "never")  # config.data.on_device (in_memory.use_on_device)
# The script that runs each task, for the wrong-entry-point error.
ENTRY_POINTS = {
    "pretrain": "train.py",
    "segment": "segment.py",
    "linprobe": "linprobe.py",
    "finetune": "finetune.py",
}
# The module whose `check_config` checks each task's config.
CONFIG_CHECKS = {
    "pretrain": "mae_jax.pretrain.config",
    "segment": "mae_jax.segmentation.config",
    "linprobe": "mae_jax.classification.config",
    "finetune": "mae_jax.classification.config",
}


class ConfigError(BadInputError, ValueError):
    """A config value that cannot work; the message names each problem and its fix, so the
    entry points print it without a traceback (exit status 2)."""


def parse_arg(arg: str | None) -> dict[str, str]:
    """Config-file argument 'decoder_depth=4,decoder_width=256' -> {'decoder_depth': '4', ...}."""
    out = {}
    for item in (arg or "").split(","):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"Config argument {item!r} is not key=value.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def int_arg(values: dict[str, str], key: str) -> int:
    """`values[key]` (from `parse_arg`) as an int, or a ConfigError naming the argument."""
    try:
        return int(values[key])
    except ValueError:
        raise ConfigError(f"Config argument {key}={values[key]!r}: expected an integer, e.g. "
                          f"{key}=4.") from None


def encoder_fields(model: ml_collections.ConfigDict) -> None:
    """Adds the optional encoder overrides (None = the variant's value) to `config.model`."""
    model.patch_size = config_dict.placeholder(int)  # Override the variant's patch size.
    model.embed_dim = config_dict.placeholder(int)  # Override the encoder width.
    model.depth = config_dict.placeholder(int)  # Override the encoder depth.
    model.num_heads = config_dict.placeholder(int)  # Override the encoder head count.


def encoder_dims(model: ml_collections.ConfigDict) -> dict[str, int]:
    """{patch_size, embed_dim, depth, num_heads}: the variant's, with explicit overrides."""
    dims = dict(vars(get_variant(model.variant)))
    for name in ENCODER_FIELDS:
        if model.get(name) is not None:
            dims[name] = int(model[name])
    return dims


def check_task(config: ml_collections.ConfigDict, task: str) -> None:
    """A config written for another entry point is one clear error."""
    got = config.get("task")
    if got != task:
        script = ENTRY_POINTS.get(got)
        hint = f"run it with `python {script}`" if script else "set config.task"
        raise ConfigError(
            f"This config is for task {got!r}, not {task!r} ({ENTRY_POINTS[task]}): {hint}."
        )


def check_task_config(config: ml_collections.ConfigDict, task: str, *,
                      num_devices: int | None, num_processes: int | None) -> None:
    """The task's own `check_config` (the module CONFIG_CHECKS names); the counts None: every
    check but those that depend on them."""
    by_task = {"task": task} if task in ("linprobe", "finetune") else {}
    importlib.import_module(CONFIG_CHECKS[task]).check_config(
        config, num_devices=num_devices, num_processes=num_processes, **by_task)


def check_early(config: ml_collections.ConfigDict, task: str) -> None:
    """The task, then every check of the task's `check_config` that does not need the device
    or process counts: the entry points run this before JAX loads, so a bad value is one
    message in a fraction of a second. The library runs all of them once the devices are known
    (a config with both kinds of problem shows this kind first)."""
    check_task(config, task)
    check_task_config(config, task, num_devices=None, num_processes=None)


def check_model(model: ml_collections.ConfigDict, problems: list[str]) -> dict[str, int] | None:
    """Variant, overrides, image size and dtype; returns the resolved dims when they exist."""
    if model.dtype not in DTYPES:
        problems.append(f"model.dtype {model.dtype!r} is not one of {', '.join(DTYPES)}")
    if model.variant not in VARIANTS:
        problems.append(f"model.variant {model.variant!r} is not one of {', '.join(VARIANTS)}")
        return None
    dims = encoder_dims(model)
    bad = [f"model.{k} {v}" for k, v in dims.items() if v < 1]
    if bad:
        problems.append(f"{', '.join(bad)} must be >= 1")
        return None
    if model.image_size < 1 or model.image_size % dims["patch_size"]:
        problems.append(
            f"model.image_size {model.image_size} is not a multiple of the patch size "
            f"{dims['patch_size']}"
        )
    if dims["embed_dim"] % dims["num_heads"]:
        problems.append(
            f"model width {dims['embed_dim']} is not divisible by num_heads {dims['num_heads']}"
        )
    return dims


def check_batch(
    config: ml_collections.ConfigDict, problems: list[str], *, num_devices: int | None,
    num_processes: int | None,
) -> None:
    """batch_size > 0, split evenly over processes and (per micro-batch) over devices. With
    the counts None (before JAX starts: `check_early`), only what does not depend on them."""
    batch, accum = config.batch_size, config.get("grad_accum_steps", 1)
    if batch < 1:
        problems.append(f"batch_size must be >= 1, got {batch}")
        return
    if accum < 1 or batch % accum:
        problems.append(
            f"batch_size {batch} must be a multiple of grad_accum_steps {accum} (>= 1)"
        )
    elif num_devices is None:
        pass
    elif accum == 1 and batch % num_devices:
        problems.append(f"batch_size {batch} must be a multiple of the {num_devices} devices")
    elif (batch // accum) % num_devices:
        problems.append(
            f"micro-batch batch_size/grad_accum_steps = {batch // accum} must be a multiple of "
            f"the {num_devices} devices; change batch_size or grad_accum_steps"
        )
    if num_processes is not None and batch % num_processes:
        problems.append(f"batch_size {batch} must be a multiple of the {num_processes} processes")
    mesh = config.get("mesh")
    if mesh is None or "fsdp" not in mesh:
        return
    data, fsdp = mesh.get("data", -1), mesh.fsdp
    if num_devices is None:  # what no device count makes right
        if (data, fsdp) == (-1, -1) or not all(size == -1 or size >= 1 for size in (data, fsdp)):
            problems.append(f"mesh.data={data} x mesh.fsdp={fsdp}: each must be >= 1 or -1 (the "
                            "rest of the devices), at most one of them -1")
    else:
        from mae_jax.core.sharding import mesh_shape

        try:
            mesh_shape(data, fsdp, num_devices)
        except ValueError:
            problems.append(f"mesh.data={data} x mesh.fsdp={fsdp} does not fit the {num_devices} "
                            f"devices: make data * fsdp == {num_devices}, or set one (at most "
                            "one) of them to -1, the rest")


def multiple_of_devices(name: str, value: int, num_devices: int | None,
                        problems: list[str]) -> None:
    """`value` (config field `name`) >= 1 and, once the count is known, a multiple of it."""
    if value < 1:
        problems.append(f"{name} {value} must be >= 1")
    elif num_devices is not None and value % num_devices:
        problems.append(f"{name} {value} must be a multiple of the {num_devices} devices")


def profile_steps(text: str) -> tuple[int, int] | None:
    """config.profile_steps 'A:B' -> (A, B): trace steps A + 1 to B; '' -> None."""
    if not text:
        return None
    first, _, last = str(text).partition(":")
    try:
        steps = int(first), int(last)
    except ValueError:
        steps = None
    if steps is None or not 0 <= steps[0] < steps[1]:
        raise ValueError(f"profile_steps {text!r} must be 'A:B' with 0 <= A < B, e.g. '10:15' "
                         "(traces steps 11 to 15), or '' (no trace)")
    return steps


def check_run(config: ml_collections.ConfigDict, problems: list[str]) -> None:
    """Cadences, retention, the profiled steps and the init_from path."""
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if name in config and config[name] < 1:
            problems.append(f"{name} must be >= 1, got {config[name]}")
    try:
        profile_steps(config.get("profile_steps", ""))
    except ValueError as error:
        problems.append(str(error))
    init_from = config.get("init_from")
    if init_from and not os.path.exists(os.path.expanduser(init_from)):
        problems.append(
            f"init_from {init_from!r} does not exist: give an official .pth file (e.g. "
            "mae_pretrain_vit_base.pth) or a run directory"
        )


def check_schedule(config: ml_collections.ConfigDict, problems: list[str]) -> None:
    """warmup shorter than training, where both are known before the data is counted (both
    in steps, or both in epochs); `schedule_lengths` checks the mixed cases."""
    warmup_steps, total_steps = config.get("warmup_steps", 0), config.total_steps
    if warmup_steps > 0 and total_steps > 0:
        warmup, total, unit = warmup_steps, total_steps, "steps"
    elif warmup_steps <= 0 and total_steps <= 0:
        warmup, total, unit = config.warmup_epochs, config.num_epochs, "epochs"
    else:
        return
    if total > 0 and warmup >= total:
        problems.append(f"warmup ({warmup} {unit}) must be shorter than training ({total} "
                        f"{unit}): lower warmup_{unit} or train longer")


def check_device_resize(config: ml_collections.ConfigDict, problems: list[str], *,
                        host_only: str = "") -> None:
    """data.device_resize_canvas: 0, or an int >= model.image_size; `host_only` names an
    augmentation of this config that runs on the host after the resize (then it must be 0)."""
    canvas, size = config.data.device_resize_canvas, config.model.image_size
    if not isinstance(canvas, int) or isinstance(canvas, bool) or (canvas and canvas < size):
        problems.append(f"data.device_resize_canvas {canvas!r} must be 0 (resize on the host) "
                        f"or an int >= model.image_size {size}")
    elif canvas and host_only:
        problems.append(f"data.device_resize_canvas needs the plain random crop + flip, not "
                        f"{host_only}, which runs on the host: set it to 0")


def check_source(source: str, problems: list[str], field: str = "data.source") -> None:
    """tfds:NAME | folder:PATH | generated:N (N >= 1), before JAX loads (QA: generated:0 was
    a traceback once the run had started)."""
    kind, colon, rest = str(source).partition(":")
    if kind == "generated" and (not rest.isdigit() or int(rest) < 1):
        problems.append(f"{field} {source!r}: use generated:N with N >= 1 images")
    elif kind not in ("tfds", "folder", "generated") or not colon or not rest.strip():
        problems.append(f"{field} {source!r} is not tfds:NAME, folder:PATH or generated:N")


def check_on_device(config: ml_collections.ConfigDict, problems: list[str]) -> None:
    """data.on_device: auto | always | never (`mae_jax.data.in_memory.use_on_device`)."""
    if config.data.on_device not in ON_DEVICE_MODES:
        problems.append(f"data.on_device must be one of {', '.join(ON_DEVICE_MODES)}, got "
                        f"{config.data.on_device!r}")
    elif config.data.on_device != "never" and config.seed < 0:
        problems.append(f"seed {config.seed} must be >= 0 for the on-device input "
                        f"(data.on_device={config.data.on_device!r}); or set it to 'never'")


CPU_DEVICES_FLAG = "xla_force_host_platform_device_count"


def apply_cpu_devices(config: ml_collections.ConfigDict, environ=os.environ) -> int:
    """`config.mesh.cpu_devices` N > 0: JAX's CPU backend as N devices, the batch sharded over
    them (as over GPUs); 0 (the default): JAX's one CPU device, whose ops use every core.

    On a CPU, N = the core count can be faster for small models and slower for larger ones
    (measured in README, "Several GPUs and hosts"), so it is a choice. Runs on GPUs are
    unaffected. Must run before JAX starts its backends (the entry points call it first);
    returns N.
    """
    mesh = config.get("mesh") or {}
    count = mesh.get("cpu_devices", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ConfigError(f"mesh.cpu_devices {count!r} must be an int >= 0: 0 keeps JAX's one "
                          "CPU device, N > 0 splits the CPU into N devices (e.g. its cores)")
    if not count:
        return 0
    if CPU_DEVICES_FLAG in environ.get("XLA_FLAGS", ""):
        raise ConfigError(f"mesh.cpu_devices={count} and XLA_FLAGS={environ['XLA_FLAGS']!r} "
                          f"both set the CPU device count: drop --{CPU_DEVICES_FLAG} from "
                          "XLA_FLAGS or set mesh.cpu_devices=0")
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("apply_cpu_devices must run before JAX starts its backends")
    jax.config.update("jax_num_cpu_devices", count)
    return count


def schedule_lengths(config, num_examples: int) -> dict[str, int]:
    """Epoch-denominated durations -> optimiser steps (the one place this is converted)."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"The dataset has {num_examples} examples, fewer than one batch of "
            f"{config.batch_size}: lower batch_size."
        )
    total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    warmup = (
        config.warmup_steps
        if config.get("warmup_steps", 0) > 0
        else int(round(config.warmup_epochs * steps_per_epoch))
    )
    if warmup >= total:
        raise ConfigError(
            f"warmup ({warmup} steps) must be shorter than training ({total} steps): lower "
            "warmup_epochs / warmup_steps or train longer."
        )
    return {"steps_per_epoch": steps_per_epoch, "total_steps": int(total), "warmup_steps": warmup}


def check_learning_rates(config: ml_collections.ConfigDict, problems: list[str]) -> None:
    """lr / base_lr: 0 means "not set" (base_lr then scales with the batch); a negative value
    is a mistake, not "use the other one"."""
    for name in ("lr", "base_lr"):
        if config.get(name, 0.0) < 0:
            problems.append(f"{name} {config.get(name)} must be >= 0 (0: not set)")


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
