"""MAE pretraining: `train_and_evaluate(config, workdir)` behind `train.py`.

Sections: config checks -> Set up Mesh -> Data -> Model and optimiser -> Load checkpoint ->
Train loop -> Export. The step is one jit over the mesh with explicit shardings and donated
state; gradient accumulation runs inside it (lax.scan over micro-batches).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mae_jax import optim, training
from mae_jax import sharding as sharding_lib
from mae_jax.checkpointing import Checkpointer, save_pytree
from mae_jax.models.mae import MAE, check_mask_ratio
from mae_jax.models.registry import VARIANTS, create_mae, get_variant
from mae_jax.models.vit import FixedEmbedding
from mae_jax.run_logging import RunLogger

MODEL_OVERRIDES = ("patch_size", "embed_dim", "depth", "num_heads")


# --------------------------------------------------------------------------- Model from config
def model_kwargs(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Arguments of `create_mae` from `config.model` (0 / "" fields mean "the variant's")."""
    kwargs = {
        "image_size": model_config.image_size,
        "decoder_embed_dim": model_config.decoder_embed_dim,
        "decoder_depth": model_config.decoder_depth,
        "decoder_num_heads": model_config.decoder_num_heads,
        "norm_pix_loss": model_config.norm_pix_loss,
        "dtype": training.parse_dtype(model_config.dtype),
        "attention_impl": model_config.get("attention_impl", "auto") or None,
    }
    for name in MODEL_OVERRIDES:
        if model_config.get(name):
            kwargs[name] = model_config[name]
    return kwargs


def build_model(model_config: ml_collections.ConfigDict, *, seed: int = 0) -> MAE:
    return create_mae(model_config.variant, rngs=nnx.Rngs(seed), **model_kwargs(model_config))


# --------------------------------------------------------------------------- Config checks
def check_config(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int):
    """Every impossible combination, reported together before any data or compile work."""
    problems = []
    model = config.model
    if model.variant not in VARIANTS:
        problems.append(f"model.variant {model.variant!r} is not one of {', '.join(VARIANTS)}")
    else:
        patch = model.get("patch_size") or get_variant(model.variant).patch_size
        width = model.get("embed_dim") or get_variant(model.variant).embed_dim
        heads = model.get("num_heads") or get_variant(model.variant).num_heads
        if model.image_size % patch:
            problems.append(
                f"model.image_size {model.image_size} is not a multiple of the patch size {patch}"
            )
        elif isinstance(config.mask_ratio, float) and 0 < config.mask_ratio < 1:
            if int((model.image_size // patch) ** 2 * (1 - config.mask_ratio)) < 1:
                problems.append(f"mask_ratio {config.mask_ratio} keeps no patch")
        if width % heads:
            problems.append(f"model width {width} is not divisible by num_heads {heads}")
    if model.decoder_embed_dim % model.decoder_num_heads:
        problems.append(
            f"decoder_embed_dim {model.decoder_embed_dim} is not divisible by "
            f"decoder_num_heads {model.decoder_num_heads}"
        )
    if model.dtype not in training.DTYPES:
        problems.append(f"model.dtype {model.dtype!r} is not one of {', '.join(training.DTYPES)}")
    try:
        check_mask_ratio(config.mask_ratio)
    except ValueError as error:
        problems.append(str(error))
    accum = config.grad_accum_steps
    if accum < 1 or config.batch_size % accum:
        problems.append(
            f"batch_size {config.batch_size} must be a multiple of grad_accum_steps {accum} (>= 1)"
        )
    elif (config.batch_size // accum) % num_devices:
        problems.append(
            f"micro-batch batch_size/grad_accum_steps = {config.batch_size // accum} must be a "
            f"multiple of the {num_devices} devices; change batch_size or grad_accum_steps"
        )
    if config.batch_size % num_processes:
        problems.append(f"batch_size must be a multiple of the {num_processes} processes")
    for name in ("log_every_steps", "checkpoint_every_steps"):
        if config[name] < 1:
            problems.append(f"{name} must be >= 1, got {config[name]}")
    if config.num_epochs <= 0 and config.total_steps <= 0:
        problems.append("set num_epochs > 0 or total_steps > 0")
    if config.base_lr <= 0 and config.lr <= 0:
        problems.append("set base_lr > 0 (scaled by batch_size/256) or an absolute lr > 0")
    if problems:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(problems))


def schedule_lengths(config, num_examples: int) -> dict[str, int]:
    """Epoch-denominated durations -> optimiser steps (the one place this is converted)."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
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
        raise ValueError(
            f"warmup ({warmup} steps) must be shorter than training ({total} steps): lower "
            "warmup_epochs / warmup_steps or train longer."
        )
    return {"steps_per_epoch": steps_per_epoch, "total_steps": int(total), "warmup_steps": warmup}


def peak_learning_rate(config) -> float:
    if config.lr > 0:
        return float(config.lr)
    return optim.scale_learning_rate(config.base_lr, config.batch_size)


def create_tx(config, schedule) -> optax.GradientTransformation:
    return optim.create_optimizer(
        learning_rate=schedule,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        weight_decay_mask=optim.weight_decay_mask,
        clip_grad_norm=config.clip_grad_norm or None,
    )


# --------------------------------------------------------------------------- Train step
def make_train_step(graphdef, tx, schedule, *, mask_ratio: float, grad_accum_steps: int):
    """(state, batch) -> (state, metrics); `batch["image"]`: [B, H, W, C] normalised."""

    def loss_fn(params, rest, images, rng):
        model = nnx.merge(graphdef, params, rest)
        loss, _, _ = model(images, rng=rng, mask_ratio=mask_ratio)
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state, batch):
        # fold_in(step): masks depend only on (seed, step), so a resumed run masks the same.
        rng = jax.random.fold_in(state["rng"], state["step"])
        images = batch["image"]
        if grad_accum_steps == 1:
            loss, grads = grad_fn(state["params"], state["rest"], images, rng)
        else:
            # [B] -> [accum, B/accum] keeping each device's rows on that device.
            micro = images.reshape(-1, grad_accum_steps, *images.shape[1:]).swapaxes(0, 1)

            def accumulate(carry, inputs):
                index, micro_images = inputs
                loss, grads = grad_fn(
                    state["params"], state["rest"], micro_images, jax.random.fold_in(rng, index)
                )
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
            (loss, grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(grad_accum_steps), micro)
            )
            loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss)
        new_state = dict(
            state,
            step=state["step"] + 1,
            params=params,
            opt_state=opt_state,
            nonfinite_steps=state["nonfinite_steps"] + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state["step"]),
        }
        return new_state, metrics

    return train_step


def initial_state_fn(config, tx):
    """A function building the whole train state (run under jit so it is born sharded)."""

    def init():
        model = build_model(config.model, seed=config.seed)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "rest": rest,
            "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(config.seed + 1),
            "nonfinite_steps": jnp.zeros((), jnp.int32),
        }

    return init


# --------------------------------------------------------------------------- Export / reload
def export_encoder(workdir: str, config, graphdef, state) -> dict[str, str]:
    """Writes the encoder as an official .pth (if torch is installed) and a Flax checkpoint."""
    from mae_jax.convert import save_official

    params, rest = state["params"], state["rest"]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
    model = nnx.merge(graphdef, params, rest)
    export_dir = os.path.join(workdir, "export")
    os.makedirs(export_dir, exist_ok=True)
    paths = {}
    encoder_state = nnx.state(model.encoder, nnx.Any(nnx.Param, FixedEmbedding))
    save_pytree(os.path.join(export_dir, "encoder_flax"), encoder_state, force=True)
    paths["flax"] = os.path.join(export_dir, "encoder_flax")
    with open(os.path.join(export_dir, "model_config.json"), "w") as handle:
        json.dump(config.model.to_dict(), handle, indent=2)
    if jax.process_index() == 0:
        try:
            save_official(model.encoder, os.path.join(export_dir, "encoder.pth"))
            save_official(model, os.path.join(export_dir, "mae_full.pth"))
            paths["pth"] = os.path.join(export_dir, "encoder.pth")
        except ImportError as error:
            print(f"Skipping the .pth export: {error}")
    return paths


def load_pretrained_model(workdir: str, *, step: int | None = None) -> MAE:
    """The MAE of a train.py workdir (its newest checkpoint, or `step`), on the host."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{workdir} is not a train.py workdir (no config.json).")
    with open(config_path) as handle:
        config = ml_collections.ConfigDict(json.load(handle))
    model = build_model(config.model, seed=config.seed)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(checkpoint_dir) if s.isdigit()) if os.path.isdir(
        checkpoint_dir
    ) else []
    if not steps:
        raise FileNotFoundError(f"No finished checkpoint in {checkpoint_dir}.")
    step = steps[-1] if step is None else step
    checkpointer = Checkpointer(workdir)
    tx = create_tx(config, optax.constant_schedule(0.0))
    abstract = jax.eval_shape(initial_state_fn(config, tx))
    state, _ = checkpointer.restore(step, abstract_state=abstract)
    checkpointer.close()
    nnx.update(model, state["params"], state["rest"])
    return model


# --------------------------------------------------------------------------- Main
def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices=None
) -> dict[str, Any]:
    """Pretrains (or resumes) an MAE in `workdir`; returns the last logged metrics.

    devices: the devices of the mesh (default: all devices of all processes).
    """
    from mae_jax.data import pretrain as data  # TensorFlow: input pipeline only

    workdir = training.ensure_workdir(workdir)
    devices = list(devices or jax.devices())
    check_config(config, num_devices=len(devices), num_processes=jax.process_count())
    is_main = jax.process_index() == 0

    # ----------------------------------------------------------------- Set up Mesh
    mesh = sharding_lib.create_mesh(
        data=config.mesh.data, fsdp=config.mesh.fsdp, devices=devices
    )
    print(f"Mesh: {dict(mesh.shape)} over {len(devices)} {devices[0].platform} device(s), "
          f"{jax.process_count()} process(es).")

    # ----------------------------------------------------------------- Data
    source = prepare_source(config, workdir)
    data_dir = config.data.data_dir or None
    num_examples = data.num_examples(
        source=source, data_dir=data_dir, split=config.data.split
    )
    lengths = schedule_lengths(config, num_examples)
    total_steps, warmup_steps = lengths["total_steps"], lengths["warmup_steps"]
    peak_lr = peak_learning_rate(config)
    schedule = optim.warmup_cosine_schedule(
        peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps,
        min_lr=config.min_lr,
    )
    micro_batch = config.batch_size // config.grad_accum_steps
    print(f"{num_examples} training images, {lengths['steps_per_epoch']} steps/epoch, "
          f"{total_steps} steps ({warmup_steps} warmup), peak lr {peak_lr:.3g}, effective "
          f"batch {config.batch_size} = {config.grad_accum_steps} micro-batch(es) of "
          f"{micro_batch}.")

    # ----------------------------------------------------------------- Model and optimiser
    tx = create_tx(config, schedule)
    init_fn = initial_state_fn(config, tx)
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config.model, seed=config.seed)),
                         nnx.Param, ...)[0]

    # ----------------------------------------------------------------- Load checkpoint
    checkpointer = Checkpointer(
        workdir, save_every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints
    )
    state, state_shardings, start_step, _ = training.init_or_restore(init_fn, mesh, checkpointer)
    num_params = training.tree_size(state["params"])
    print(f"Resuming from step {start_step}." if start_step else "Starting from scratch.",
          f"{num_params / 1e6:.2f}M trainable parameters.")
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as handle:
            handle.write(config.to_json_best_effort(indent=2))

    batches = data.create_pretrain_iterator(
        source=source,
        image_size=config.model.image_size,
        global_batch_size=config.batch_size,
        seed=config.seed,
        data_dir=data_dir,
        split=config.data.split,
        start_step=start_step,
        download=config.data.download,
        shuffle_buffer_size=config.data.shuffle_buffer_size,
        augment=config.data.augment,
    )
    step_fn = make_train_step(
        graphdef, tx, schedule, mask_ratio=config.mask_ratio,
        grad_accum_steps=config.grad_accum_steps,
    )
    train_step = training.compile_step(step_fn, state_shardings, mesh)

    logger = RunLogger(
        workdir, total_steps=total_steps, is_main=is_main, log_every=config.log_every_steps,
        global_batch_size=config.batch_size, start_step=start_step,
        tensorboard=config.get("tensorboard", True),
    )
    hooks = []
    if config.visualize_every_steps > 0 and config.num_visualize_images > 0:
        hooks.append(training.Hook(
            config.visualize_every_steps,
            reconstruction_hook(config, graphdef, source, data_dir, logger),
        ))

    # ----------------------------------------------------------------- Train loop
    result = {"total_steps": total_steps}
    try:
        state, step = training.run_loop(
            state=state, train_step=train_step, batches=batches, mesh=mesh,
            start_step=start_step, total_steps=total_steps, checkpointer=checkpointer,
            logger=logger, hooks=tuple(hooks),
            metadata_fn=lambda step: {"step": step, "images_seen": step * config.batch_size},
        )
        result["step"] = step
        # ------------------------------------------------------------- Export
        if step >= total_steps:
            if config.export_encoder:
                result["export"] = export_encoder(workdir, config, graphdef, state)
            result["loss_curve"] = logger.save_loss_curve()
    finally:
        checkpointer.close()
        logger.close()
    records = [r for r in _read_train_metrics(workdir) if "loss" in r]
    if records:
        result["loss"] = records[-1]["loss"]
    return result


def _read_train_metrics(workdir):
    from mae_jax.run_logging import read_metrics

    return read_metrics(workdir)


def prepare_source(config, workdir: str) -> str:
    """`generated:N` (the demo's offline data) -> a folder of N generated images in workdir."""
    source = config.data.source
    if source.startswith("generated:"):
        from mae_jax.data.generated import write_generated_images

        count = int(source.split(":", 1)[1])
        folder = os.path.join(workdir, "generated_images")
        write_generated_images(folder, count=count, size=config.data.get("generated_size", 64),
                               seed=config.seed)
        return f"folder:{folder}"
    return source


def reconstruction_hook(config, graphdef, source, data_dir, logger):
    """Every N steps: masked | reconstruction | pasted | original for fixed images."""
    from mae_jax.data import pretrain as data
    from mae_jax.visualize import figure_rows, reconstruct

    images = jnp.asarray(data.load_fixed_images(
        source=source, image_size=config.model.image_size,
        count=config.num_visualize_images, data_dir=data_dir,
        download=config.data.download,
    ))
    patch = config.model.get("patch_size") or get_variant(config.model.variant).patch_size
    num_patches = (config.model.image_size // patch) ** 2
    # The same masks at every call, so figures over training are comparable.
    noise = jax.random.uniform(jax.random.PRNGKey(config.seed + 2), (images.shape[0], num_patches))

    @jax.jit
    def run(params, rest):
        model = nnx.merge(graphdef, params, rest)
        return reconstruct(model, images, noise=noise, mask_ratio=config.mask_ratio)

    def hook(step, state):
        parts = jax.device_get(run(state["params"], state["rest"]))
        logger.log_images(step, {"reconstruction": figure_rows(parts)})

    return hook
