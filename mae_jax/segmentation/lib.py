"""ADE20K semantic segmentation with an MAE ViT backbone and UPerNet: `segment.py`'s library.

The shared core (`mae_jax.core`) runs the mesh, state, checkpoints, logging and loop; this
module supplies the segmenter, its loss, the layer-decay optimiser, the backbone initialisation
and the sliding-window evaluation hook.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from mae_jax.core import config as core_config
from mae_jax.core import loop, optim
from mae_jax.core.errors import WeightsError
from mae_jax.core.processes import failing_together, same_on_every_process
from mae_jax.core.run import Run, with_step
from mae_jax.core.state import TrainState, place_values
from mae_jax.core.step import make_train_step
from mae_jax.data.constants import normalize_uint8
from mae_jax.data.photometric import apply_photometric
from mae_jax.models.factory import ModelSpec, encoder_of
from mae_jax.models.layers import make_rngs
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


def lr_schedule(config) -> optax.Schedule:
    """mmseg's poly decay after a linear warmup; 0 throughout with eval_only."""
    if config.eval_only:
        return optax.constant_schedule(0.0)
    return optim.warmup_poly_schedule(
        peak_lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.total_steps,
        power=config.poly_power, min_lr=config.min_lr,
    )


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
        images = batch["image"]
        if "photometric" in batch:  # left to the device by the input pipeline
            images = apply_photometric(images, batch["photometric"])
        images = normalize_uint8(images)
        logits, aux_logits = model(images, train=True, rngs=make_rngs(dropout=rng))
        decode_loss = segmentation_loss(logits, batch["label"])
        aux_loss = segmentation_loss(aux_logits, batch["label"])
        loss = decode_loss + aux_weight * aux_loss
        return loss, {"decode_loss": decode_loss, "aux_loss": aux_loss}

    return loss_fn


def init_backbone(init_from: str, spec: ModelSpec, step: int | None = None
                  ) -> dict[tuple, np.ndarray]:
    """{state path: host array} of the backbone leaves an encoder checkpoint provides.

    The source is any checkpoint `mae_jax.weights.load.load_encoder` reads (an official .pth,
    an HF folder, a run directory or export); position embeddings are resized to the
    segmentation grid. Leaves MAE checkpoints lack (layer-scale gammas, relative position
    tables) keep their initial values.
    """
    from mae_jax.weights.load import copy_encoder_from

    target = encoder_of(nnx.eval_shape(spec.build))
    # The final norm is unused (features come before it); a fine-tuned classifier lacks it.
    allow_missing = (*NOT_IN_MAE_CHECKPOINTS, r"^norm\.")
    copied = set(copy_encoder_from(init_from, target, allow_missing=allow_missing, step=step))
    return {("backbone", *path): np.asarray(variable.get_value())
            for path, variable in nnx.to_flat_state(nnx.state(target)) if path in copied}


def load_segmenter(init_from: str, spec: ModelSpec, step: int | None = None
                   ) -> dict[tuple, np.ndarray] | None:
    """{state path: host array} of a whole segmenter at `init_from` (mmseg's MAE UPerNet .pth,
    a segment.py run directory or export) fitted to `spec`, or None when it holds only an
    encoder. A segmenter of another shape is an error naming the differences."""
    from mae_jax.weights import mmseg
    from mae_jax.weights.load import check_heads, load_model, source_kind

    target = nnx.eval_shape(spec.build)
    if mmseg.is_mmseg_checkpoint(init_from):
        mmseg.load_mmseg(target, init_from)  # one error naming every key that does not fit
        return {path: np.asarray(variable.get_value())
                for path, variable in nnx.to_flat_state(nnx.state(target))
                if isinstance(variable.get_value(), np.ndarray | jax.Array)}
    if source_kind(init_from) == "official":
        return None
    model = load_model(init_from, step=step)
    if type(model).__name__ != type(target).__name__:
        return None
    check_heads(model, target)
    mine = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(target))}
    theirs = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    differ = sorted("/".join(map(str, p)) for p in set(mine) ^ set(theirs)
                    | {p for p in set(mine) & set(theirs) if mine[p] != theirs[p].shape})
    if differ:
        raise WeightsError(
            f"The segmenter in {init_from} does not fit this config (model size, classes, "
            f"image size or head widths differ): {', '.join(differ[:6])}. Use its config, or "
            "init from its encoder only by pointing init_from at the MAE pretraining run."
        )
    return theirs


def initialise(config, spec: ModelSpec, state: TrainState, shardings) -> tuple[TrainState, bool]:
    """A new run's weights from `config.init_from`: the whole segmenter when the source holds
    one (returns True), else the backbone (the heads keep their mmseg initialisation)."""
    if not config.init_from:
        print("Backbone initialised at random (set init_from for MAE weights).")
        return state, False
    from mae_jax.weights.load import describe, newest_step_everywhere

    step = newest_step_everywhere(config.init_from)  # a run directory's, the same everywhere
    values = load_segmenter(config.init_from, spec, step)
    whole = values is not None
    if whole:
        print(f"Segmenter (backbone, neck, heads, BatchNorm statistics) initialised from "
              f"{describe(config.init_from, step)}.")
    else:
        values = init_backbone(config.init_from, spec, step)
        print(f"Backbone initialised from {describe(config.init_from, step)} ({len(values)} "
              "arrays).")
    return place_values(state, shardings, values), whole


def export_mmseg(workdir: str, graphdef, state: TrainState) -> str | None:
    """export/segmenter_mmseg.pth: the trained segmenter in mmsegmentation's layout (what
    `init_from` and mmseg's `load_checkpoint` read); None without torch."""
    from mae_jax.weights import mmseg

    params, rest = state.params, state.rest
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
    path = os.path.join(workdir, "export", "segmenter_mmseg.pth")
    with failing_together(f"writing {path}"):
        if jax.process_index() != 0:
            return None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            mmseg.save_mmseg(nnx.merge(graphdef, params, rest), path)
        except ImportError as error:
            print(f"Skipping the mmseg export: {error}")
            return None
    return path


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices=None
) -> dict[str, Any]:
    """Fine-tunes (or resumes, or with eval_only just evaluates) in `workdir`.

    Returns the final evaluation results (aAcc, mIoU, mAcc in percent, per_class, step).
    """
    from mae_jax.data import seg_eval_input, seg_input  # TensorFlow: input pipeline only

    devices = list(devices or jax.devices())
    check_config(config, num_devices=len(devices), num_processes=jax.process_count())
    if config.data.source == "ade20k":  # missing data fails (or is prepared) before any model work
        from mae_jax.data.ade20k import load_ade20k_builder

        folders = {"data_dir": config.data.data_dir or None,
                   "manual_dir": config.data.manual_dir or None}
        splits = load_ade20k_builder(**folders).info.splits
        for split in ("train", "validation"):  # each host's copy: the same records
            same_on_every_process(splits[split].num_examples, f"the number of ADE20K {split} "
                                  "examples")
        # A run that will evaluate checks the validation pairs first (a few seconds): one
        # message naming each damaged or misfit pair before any model work, where evaluation
        # stopped at the first (QA), or with several processes raised on the process that
        # holds it while the others waited for it in the evaluation's collectives.
        if config.eval_every_steps or config.eval_only:
            seg_eval_input.check_validation_decodes("ade20k", **folders,
                                               limit=config.data.eval_limit or None)
    num_classes = seg_input.num_seg_classes(config.data.source,
                                            num_classes=config.data.num_classes)
    with Run(config, workdir, devices=devices) as run:
        # ------------------------------------------------------------- Model and state
        schedule = lr_schedule(config)
        spec = model_spec(config, num_classes)
        tx = create_tx(config, nnx.state(nnx.eval_shape(spec.build), nnx.Param), schedule)
        graphdef, state, start_step = run.init_state(spec, tx)
        trained_heads = bool(start_step)
        if not start_step:
            state, trained_heads = initialise(config, spec, state, run.state_shardings)
        logger = run.start_logging(total_steps=config.total_steps, start_step=start_step)
        evaluator = Evaluator(config, graphdef, run.mesh, num_classes, run.workdir, logger)
        if config.eval_only:
            if not trained_heads:
                print(f"WARNING: eval_only found no checkpoint in {run.workdir} and init_from "
                      "holds no segmenter: the UPerNet heads are untrained, so these metrics "
                      "only check the pipeline. Point --workdir at a segment.py run, or "
                      "init_from at one or at an mmseg MAE UPerNet checkpoint.")
            return evaluator(start_step, state)

        # ------------------------------------------------------------- Train loop
        batches = seg_input.create_seg_train_iterator(
            **data_options(config),
            global_batch_size=config.batch_size,
            crop_size=config.model.image_size,
            seed=config.seed,
            start_step=start_step,
            ratio_range=tuple(config.data.ratio_range),
            device_photometric=config.data.device_photometric,
        )
        step_fn = make_train_step(graphdef, make_loss_fn(config.aux_weight), tx, schedule)
        results: dict[str, Any] = {}

        def evaluate(step, state):
            results.update(evaluator(step, state))

        result = run.train(
            state, step_fn, batches, start_step=start_step, total_steps=config.total_steps,
            hooks=(loop.Hook(config.eval_every_steps, evaluate,
                             missed=lambda step: not run.evaluated_at(step)),),
        )
        if result.step >= config.total_steps and not result.preempted:  # else the re-run does it
            with failing_together("writing the loss curve"):  # process 0
                logger.save_loss_curve()
            if not results:  # evaluated before this resume: that evaluation's results
                results.update(evaluator.recorded(result.step))
            if config.export_mmseg:
                results["export"] = export_mmseg(run.workdir, graphdef, result.state)
    return with_step(results, result.step)
