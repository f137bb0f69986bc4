"""ADE20K semantic segmentation with an MAE ViT backbone and UPerNet: `segment.py`'s library.

The shared core (`mae_jax.core`) runs the mesh, state, checkpoints, logging and loop; this
module supplies the segmenter, its loss, the layer-decay optimiser, the backbone initialisation
and the sliding-window evaluation hook.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from mae_jax.core import config as core_config
from mae_jax.core import loop, optim
from mae_jax.core.run import Run
from mae_jax.core.state import TrainState
from mae_jax.core.step import make_train_step
from mae_jax.models.factory import ModelSpec, encoder_of
from mae_jax.models.upernet import segmentation_loss
from mae_jax.segmentation.config import check_config
from mae_jax.segmentation.evaluation import Evaluator, data_options

# Absent from MAE checkpoints: layer-scale gammas and relative position tables start at init.
NOT_IN_MAE_CHECKPOINTS = (r"\.gamma_[12]$", r"\.relative_position_bias_table$")


def model_spec(config: ml_collections.ConfigDict, num_classes: int) -> ModelSpec:
    model = config.model
    return ModelSpec("MAESegmenter", {
        "variant": model.variant,
        **core_config.encoder_dims(model),
        "image_size": model.image_size,
        "num_classes": num_classes,
        "out_indices": list(model.out_indices),
        "drop_path_rate": model.drop_path_rate,
        "layer_scale_init": model.layer_scale_init or None,
        "relative_position_bias": model.relative_position_bias,
        "channels": model.channels,
        "aux_channels": model.aux_channels,
        "dropout": model.dropout,
        "dtype": model.dtype,
        "attention_impl": model.attention_impl or None,
    })


def create_tx(config, params, schedule) -> optax.GradientTransformation:
    """AdamW with mmseg's layer-wise lr decay over the backbone blocks."""
    scales = optim.layer_decay_scales(
        params, decay=config.layer_decay, depth=core_config.encoder_dims(config.model)["depth"],
        prefix=("backbone",), convention="mmseg",
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


def make_loss_fn(aux_weight: float):
    """loss_fn(model, batch, rng): decode + aux_weight * auxiliary cross-entropy (mmseg)."""

    def loss_fn(model, batch, rng):
        logits, aux_logits = model(batch["image"], train=True, rngs=nnx.Rngs(dropout=rng))
        decode_loss = segmentation_loss(logits, batch["label"])
        aux_loss = segmentation_loss(aux_logits, batch["label"])
        loss = decode_loss + aux_weight * aux_loss
        return loss, {"decode_loss": decode_loss, "aux_loss": aux_loss}

    return loss_fn


def init_backbone(init_from: str, spec: ModelSpec, state: TrainState, shardings) -> TrainState:
    """Replaces the backbone leaves of the sharded state by an encoder's weights.

    The source is any checkpoint `mae_jax.weights.load.load_encoder` reads (an official .pth or
    a run directory); position embeddings are resized to the segmentation grid. Leaves MAE
    checkpoints lack (layer-scale gammas, relative position tables) keep their initial values.
    Each loaded leaf is placed with the sharding of the leaf it replaces.
    """
    from mae_jax.weights.load import load_encoder, source_kind, transfer_encoder

    target = encoder_of(nnx.eval_shape(spec.build))
    # Official files do not record the head count (it does not shape any weight): ours.
    overrides = {"num_heads": target.blocks[0].attn.num_heads}
    source = load_encoder(init_from, **(overrides if source_kind(init_from) == "official" else {}))
    copied = set(transfer_encoder(source, target, allow_missing=NOT_IN_MAE_CHECKPOINTS))
    values = dict(nnx.to_flat_state(nnx.state(target)))
    placement = dict(nnx.to_flat_state(shardings.params))
    leaves = []
    for path, variable in nnx.to_flat_state(state.params):
        if path[0] == "backbone" and path[1:] in copied:
            value = np.asarray(values[path[1:]].get_value())
            variable = variable.replace(jax.device_put(value, placement[path].get_value()))
        leaves.append((path, variable))
    return state.replace(params=nnx.from_flat_state(leaves))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices=None
) -> dict[str, Any]:
    """Fine-tunes (or resumes, or with eval_only just evaluates) in `workdir`.

    Returns the final evaluation results (aAcc, mIoU, mAcc in percent, per_class, step).
    """
    from mae_jax.data import seg_input  # TensorFlow: input pipeline only

    devices = list(devices or jax.devices())
    check_config(config, num_devices=len(devices), num_processes=jax.process_count())
    if config.data.source == "ade20k":  # missing data fails (or is prepared) before any model work
        from mae_jax.data.ade20k import load_ade20k_builder

        load_ade20k_builder(
            data_dir=config.data.data_dir or None, manual_dir=config.data.manual_dir or None
        )
    num_classes = seg_input.num_seg_classes(config.data.source,
                                            num_classes=config.data.num_classes)
    with Run(config, workdir, devices=devices) as run:
        # ------------------------------------------------------------- Model and state
        schedule = optim.warmup_poly_schedule(
            peak_lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.total_steps,
            power=config.poly_power, min_lr=config.min_lr,
        ) if not config.eval_only else optax.constant_schedule(0.0)
        spec = model_spec(config, num_classes)
        tx = create_tx(config, nnx.state(nnx.eval_shape(spec.build), nnx.Param), schedule)
        graphdef, state, start_step = run.init_state(spec, tx)
        if not start_step and config.init_from:
            state = init_backbone(config.init_from, spec, state, run.state_shardings)
            print(f"Backbone initialised from {config.init_from}.")
        elif not start_step:
            print("Backbone initialised at random (set init_from for MAE weights).")
        logger = run.start_logging(total_steps=config.total_steps, start_step=start_step)
        evaluator = Evaluator(config, graphdef, run.mesh, num_classes, run.workdir, logger)
        if config.eval_only:
            if not start_step:
                print(f"WARNING: eval_only found no checkpoint in {run.workdir}: the UPerNet "
                      "heads are untrained, so these metrics only check the pipeline. Point "
                      "--workdir at a segment.py run to evaluate it.")
            return evaluator(start_step, state)

        # ------------------------------------------------------------- Train loop
        batches = seg_input.create_seg_train_iterator(
            **data_options(config),
            global_batch_size=config.batch_size,
            crop_size=config.model.image_size,
            seed=config.seed,
            start_step=start_step,
            ratio_range=tuple(config.data.ratio_range),
        )
        step_fn = make_train_step(graphdef, make_loss_fn(config.aux_weight), tx, schedule)
        results: dict[str, Any] = {}

        def evaluate(step, state):
            results.update(evaluator(step, state))

        result = run.train(
            state, step_fn, batches, start_step=start_step, total_steps=config.total_steps,
            hooks=(loop.Hook(config.eval_every_steps, evaluate),),
        )
        if result.step >= config.total_steps:
            logger.save_loss_curve()
    return results | {"step": result.step}
