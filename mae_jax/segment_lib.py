"""ADE20K semantic segmentation with an MAE ViT backbone and UPerNet: `segment.py`'s library.

Reuses the pretraining machinery (mesh, sharded init/restore, compiled step, loop, checkpoints,
logging) from `mae_jax.training`; only the model, the step and the evaluation are specific.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mae_jax import optim, training
from mae_jax import sharding as sharding_lib
from mae_jax.checkpointing import Checkpointer
from mae_jax.convert import export_official, load_into, official_key
from mae_jax.models.registry import VARIANTS, get_variant
from mae_jax.models.segmenter import MAESegmenter
from mae_jax.models.upernet import segmentation_loss
from mae_jax.run_logging import RunLogger
from mae_jax.seg_evaluation import Evaluator, data_options

ENCODER_OVERRIDES = ("patch_size", "embed_dim", "depth", "num_heads")
# Absent from MAE checkpoints: layer-scale gammas and relative position tables start at init.
NOT_IN_MAE_CHECKPOINTS = (r"\.gamma_[12]$", r"\.relative_position_bias_table$")


# --------------------------------------------------------------------------- Model from config
def build_segmenter(config, num_classes: int, *, seed: int = 0) -> MAESegmenter:
    model = config.model
    overrides = {name: model[name] for name in ENCODER_OVERRIDES if model.get(name)}
    return MAESegmenter(
        variant=model.variant,
        image_size=model.image_size,
        num_classes=num_classes,
        out_indices=tuple(model.out_indices),
        drop_path_rate=model.drop_path_rate,
        layer_scale_init=model.layer_scale_init or None,
        relative_position_bias=model.relative_position_bias,
        channels=model.channels,
        aux_channels=model.aux_channels,
        dropout=model.dropout,
        dtype=training.parse_dtype(model.dtype),
        attention_impl=model.attention_impl or None,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
        **overrides,
    )


# --------------------------------------------------------------------------- Config checks
def check_config(config, *, num_devices: int, num_processes: int) -> None:
    problems = []
    model = config.model
    if model.variant not in VARIANTS:
        problems.append(f"model.variant {model.variant!r} is not one of {', '.join(VARIANTS)}")
    else:
        patch = model.get("patch_size") or get_variant(model.variant).patch_size
        depth = model.get("depth") or get_variant(model.variant).depth
        if model.image_size % patch:
            problems.append(f"model.image_size {model.image_size} is not a multiple of {patch}")
        elif (model.image_size // patch) % 2:
            problems.append(
                f"model.image_size / patch = {model.image_size // patch} must be even (the "
                "neck's 0.5x level max-pools by 2)"
            )
        if len(model.out_indices) != 4 or not all(0 <= i < depth for i in model.out_indices):
            problems.append(f"model.out_indices {model.out_indices} must be 4 blocks < {depth}")
    if model.dtype not in training.DTYPES:
        problems.append(f"model.dtype {model.dtype!r} is not one of {', '.join(training.DTYPES)}")
    if config.batch_size % num_devices:
        problems.append(
            f"batch_size {config.batch_size} must be a multiple of the {num_devices} devices"
        )
    if config.batch_size % num_processes:
        problems.append(f"batch_size must be a multiple of the {num_processes} processes")
    if config.warmup_steps >= config.total_steps and not config.eval_only:
        problems.append(
            f"warmup_steps {config.warmup_steps} must be < total_steps {config.total_steps}"
        )
    if config.eval_window != model.image_size:
        problems.append(
            f"eval_window {config.eval_window} must equal model.image_size {model.image_size} "
            "(the window is what the model sees)"
        )
    if config.eval_stride < 1:
        problems.append(f"eval_stride {config.eval_stride} must be >= 1")
    if config.data.source not in ("ade20k", "synthetic"):
        problems.append(f"data.source {config.data.source!r} must be 'ade20k' or 'synthetic'")
    elif config.data.source == "ade20k" and config.data.num_classes not in (0, 150):
        problems.append(
            f"data.num_classes {config.data.num_classes} with data.source='ade20k': ADE20K has "
            "150 classes; set data.num_classes=0 (it only configures 'synthetic')"
        )
    if config.init_from and not os.path.exists(config.init_from):
        problems.append(
            f"init_from {config.init_from!r} does not exist: give an official .pth file "
            "(e.g. mae_pretrain_vit_base.pth) or a train.py workdir"
        )
    for name in ("log_every_steps", "checkpoint_every_steps"):
        if config[name] < 1:
            problems.append(f"{name} must be >= 1")
    if problems:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- Encoder weights
def pretrained_encoder_weights(init_from: str) -> dict[str, np.ndarray]:
    """Official-format encoder weights from a .pth file or a train.py workdir."""
    if os.path.isdir(init_from):
        from mae_jax.train_lib import load_pretrained_model

        return export_official(load_pretrained_model(init_from).encoder)
    from mae_jax.convert import read_state_dict

    return read_state_dict(init_from)


def load_backbone_weights(config, params, shardings, num_classes: int):
    """Replaces the random backbone leaves of sharded `params` by pretrained ones.

    The encoder is rebuilt on the host at the segmentation size, the checkpoint loaded into it
    (position embeddings interpolated), then each loaded leaf is placed with the sharding of
    the leaf it replaces. Leaves the checkpoint lacks (layer-scale gammas) keep their
    initialised values: the host copy only holds zeros there.
    """
    weights = pretrained_encoder_weights(config.init_from)
    host_model = nnx.eval_shape(lambda: build_segmenter(config, num_classes, seed=config.seed))
    backbone = host_model.backbone
    host_state = jax.tree.map(
        lambda x: np.zeros(x.shape, x.dtype), nnx.state(backbone, nnx.Param)
    )
    nnx.update(backbone, host_state)
    load_into(backbone, weights, strict=False, allow_missing=NOT_IN_MAE_CHECKPOINTS)
    original = dict(nnx.to_flat_state(params["backbone"]))
    placement = dict(nnx.to_flat_state(shardings["backbone"]))
    leaves = []
    for path, variable in nnx.to_flat_state(nnx.state(backbone, nnx.Param)):
        if official_key(path) in weights:
            value = jax.device_put(np.asarray(variable[...]), placement[path].get_value())
            leaves.append((path, variable.replace(value)))
        else:
            leaves.append((path, original[path]))
    params = dict(params) if not isinstance(params, nnx.State) else params
    params["backbone"] = nnx.from_flat_state(leaves)
    return params


# --------------------------------------------------------------------------- Steps
def split_model(model: MAESegmenter):
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def make_train_step(graphdef, rng_state, tx, schedule, *, aux_weight: float):
    """(state, batch) -> (state, metrics); batch: image [B, S, S, 3], label [B, S, S]."""

    def loss_fn(params, batch_stats, images, labels, rng):
        # Copies made inside this trace, since the forward mutates them (BatchNorm statistics,
        # dropout / drop-path keys) and NNX refuses to mutate variables of an outer trace.
        model = nnx.merge(
            graphdef, params, *jax.tree.map(lambda x: x, (batch_stats, rng_state))
        )
        nnx.reseed(model, dropout=jax.random.wrap_key_data(rng))
        logits, aux_logits = model(images)
        decode_loss = segmentation_loss(logits, labels)
        aux_loss = segmentation_loss(aux_logits, labels)
        new_batch_stats = nnx.state(model, nnx.BatchStat)
        return decode_loss + aux_weight * aux_loss, (new_batch_stats, decode_loss, aux_loss)

    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        (loss, (batch_stats, decode_loss, aux_loss)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state["params"], state["batch_stats"], batch["image"], batch["label"], rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(
            state,
            step=state["step"] + 1,
            params=optax.apply_updates(state["params"], updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            nonfinite_steps=state["nonfinite_steps"] + (~jnp.isfinite(loss)).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "decode_loss": decode_loss,
            "aux_loss": aux_loss,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state["step"]),
        }
        return new_state, metrics

    return train_step


def create_tx(config, params, schedule):
    depth = config.model.get("depth") or get_variant(config.model.variant).depth
    scales = optim.layer_decay_scales(
        params, decay=config.layer_decay, depth=depth, prefix=("backbone",), convention="mmseg"
    )
    return optim.create_optimizer(
        learning_rate=schedule,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        # mmseg's constructor only skips 1-D params and biases in practice (its name check
        # never matches full names), so pos_embed and cls_token are decayed: same here.
        weight_decay_mask=optim.weight_decay_mask,
        layer_decay_scales=scales,
        clip_grad_norm=config.clip_grad_norm or None,
    )


# --------------------------------------------------------------------------- Main
def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices=None
) -> dict[str, Any]:
    """Fine-tunes (or resumes, or with eval_only just evaluates) in `workdir`.

    Returns the final evaluation results (aAcc, mIoU, mAcc in percent, per_class, step).
    """
    from mae_jax.data import seg_input  # TensorFlow: input pipeline only

    workdir = training.ensure_workdir(workdir)
    devices = list(devices or jax.devices())
    check_config(config, num_devices=len(devices), num_processes=jax.process_count())
    is_main = jax.process_index() == 0
    if config.data.source == "ade20k":  # missing data fails (or is prepared) before any model work
        from mae_jax.data.ade20k import load_ade20k_builder

        load_ade20k_builder(
            data_dir=config.data.data_dir or None, manual_dir=config.data.manual_dir or None
        )
    num_classes = seg_input.num_seg_classes(
        config.data.source, num_classes=config.data.num_classes or None
    )

    # ----------------------------------------------------------------- Set up Mesh
    mesh = sharding_lib.create_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, devices=devices)
    print(f"Mesh: {dict(mesh.shape)} over {len(devices)} {devices[0].platform} device(s).")

    # ----------------------------------------------------------------- Model and optimiser
    schedule = optim.warmup_poly_schedule(
        peak_lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.total_steps,
        power=config.poly_power, min_lr=config.min_lr,
    ) if not config.eval_only else optax.constant_schedule(0.0)
    abstract_model = nnx.eval_shape(lambda: build_segmenter(config, num_classes, seed=config.seed))
    abstract_params = nnx.state(abstract_model, nnx.Param)
    tx = create_tx(config, abstract_params, schedule)

    def init():
        model = build_segmenter(config, num_classes, seed=config.seed)
        _, params, batch_stats, _ = split_model(model)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(config.seed + 1),
            "nonfinite_steps": jnp.zeros((), jnp.int32),
        }

    rng_state = jax.jit(lambda: split_model(build_segmenter(config, num_classes))[3])()
    abstract_model.train()
    train_graphdef = split_model(abstract_model)[0]
    abstract_model.eval()
    eval_graphdef = split_model(abstract_model)[0]

    # ----------------------------------------------------------------- Load checkpoint
    checkpointer = Checkpointer(
        workdir, save_every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints
    )
    state, state_shardings, start_step, _ = training.init_or_restore(init, mesh, checkpointer)
    if start_step:
        print(f"Resuming from step {start_step}.")
    elif config.init_from:
        state["params"] = load_backbone_weights(
            config, state["params"], state_shardings["params"], num_classes
        )
        print(f"Backbone initialised from {config.init_from}.")
    else:
        print("Backbone initialised at random (set init_from for MAE weights).")
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as handle:
            handle.write(config.to_json_best_effort(indent=2))

    logger = RunLogger(
        workdir, total_steps=config.total_steps, is_main=is_main,
        log_every=config.log_every_steps, global_batch_size=config.batch_size,
        start_step=start_step, tensorboard=config.get("tensorboard", True),
    )
    evaluator = Evaluator(config, eval_graphdef, rng_state, mesh, num_classes, workdir, logger)
    if config.eval_only:
        if not start_step:
            print(f"WARNING: eval_only found no checkpoint in {workdir}: the UPerNet heads are "
                  "untrained, so these metrics only check the pipeline. Point --workdir at a "
                  "segment.py run to evaluate it.")
        results = evaluator(start_step, state)
        checkpointer.close()
        logger.close()
        return results

    # ----------------------------------------------------------------- Train loop
    batches = seg_input.create_seg_train_iterator(
        **data_options(config),
        global_batch_size=config.batch_size,
        crop_size=config.model.image_size,
        seed=config.seed,
        start_step=start_step,
        ratio_range=tuple(config.data.ratio_range),
    )
    step_fn = make_train_step(train_graphdef, rng_state, tx, schedule,
                              aux_weight=config.aux_weight)
    train_step = training.compile_step(step_fn, state_shardings, mesh)
    results: dict[str, Any] = {}

    def evaluate(step, state):
        results.update(evaluator(step, state))

    try:
        state, step = training.run_loop(
            state=state, train_step=train_step, batches=batches, mesh=mesh,
            start_step=start_step, total_steps=config.total_steps, checkpointer=checkpointer,
            logger=logger, metadata_fn=lambda step: {"step": step},
            hooks=(training.Hook(config.eval_every_steps, evaluate),),
        )
        if step >= config.total_steps:
            logger.save_loss_curve()
    finally:
        checkpointer.close()
        logger.close()
    return results | {"step": step}
