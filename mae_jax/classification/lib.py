"""What the linear probe and fine-tuning share: data, schedule, state, init_from, evaluation,
the loop and the exports. Each recipe (`linprobe.py`, `finetune.py` in this package) supplies
its head, trainable filter, optimiser and loss as a `Recipe`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from mae_jax.classification import transfer
from mae_jax.classification.config import check_config, resolve_resize_ratio
from mae_jax.classification.evaluation import Evaluator
from mae_jax.classification.synthetic import resolve_labelled_source
from mae_jax.core import config as core_config
from mae_jax.core import loop, optim
from mae_jax.core.errors import BadDataError
from mae_jax.core.processes import failing_together, same_on_every_process
from mae_jax.core.run import Run, with_step
from mae_jax.core.state import TrainState, place_values
from mae_jax.core.step import LossFn, make_train_step
from mae_jax.data.device_resize import resize_on_devices
from mae_jax.data.on_device import OnDeviceIterator
from mae_jax.models.factory import ModelSpec
from mae_jax.weights.load import describe, newest_step_everywhere


@dataclasses.dataclass(frozen=True)
class Recipe:
    task: str  # "linprobe" | "finetune"
    global_pool: bool  # the head: True fc_norm(mean of patches), False BatchNorm(cls token)
    trainable: Any  # nnx filter of the trained parameters
    create_tx: Callable[[ml_collections.ConfigDict, Any, optax.Schedule],
                        optax.GradientTransformation]  # (config, abstract params, schedule)
    # (config, num_classes, batch_devices: the devices a batch is split over)
    make_loss_fn: Callable[[ml_collections.ConfigDict, int, int], LossFn]


def model_spec(config: ml_collections.ConfigDict, num_classes: int, global_pool: bool):
    model = config.model
    return ModelSpec("ViTClassifier", {
        "variant": model.variant,
        **core_config.encoder_dims(model),
        "image_size": model.image_size,
        "num_classes": num_classes,
        "global_pool": global_pool,
        "drop_path_rate": model.drop_path_rate,
        "dtype": model.dtype,
        "attention_impl": model.attention_impl or None,
    })


def peak_learning_rate(config) -> float:
    if config.lr > 0:
        return float(config.lr)
    return optim.scale_learning_rate(config.base_lr, config.batch_size)


def initialise(config, spec: ModelSpec, state: TrainState, shardings) -> TrainState:
    """A new run's weights from `config.init_from`: for training the encoder (the heads start
    at their official init, as main_linprobe.py / main_finetune.py re-initialise them); with
    eval_only the whole classifier when init_from holds one."""
    if not config.init_from:
        print("Encoder initialised at random (set init_from for MAE weights).")
        return state
    step = newest_step_everywhere(config.init_from)  # a run directory's, the same everywhere
    if config.eval_only:
        model = transfer.load_classifier(config.init_from, spec=spec, step=step)
        if model is not None:
            print(f"Classifier loaded from {describe(config.init_from, step)}.")
            return place_values(state, shardings, transfer.model_values(model))
        print(f"WARNING: {config.init_from} holds an encoder, not a classifier: the head is "
              "untrained, so these metrics only check the pipeline.")
    values = transfer.encoder_values(config.init_from, spec, step=step)
    print(f"Encoder initialised from {describe(config.init_from, step)} ({len(values)} "
          "arrays).")
    return place_values(state, shardings, values)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, recipe: Recipe, *, devices=None
) -> dict[str, Any]:
    """Trains (or resumes; with eval_only just evaluates) in `workdir`; returns the last
    evaluation (top1, top5, loss, num_examples, step, split)."""
    from mae_jax.data import images as data  # TensorFlow: input pipeline only
    from mae_jax.data import in_memory

    devices = list(devices or jax.devices())
    check_config(config, task=recipe.task, num_devices=len(devices),
                 num_processes=jax.process_count())
    resolve_resize_ratio(config)
    with Run(config, workdir, devices=devices) as run:
        # ------------------------------------------------------------- Data and schedule
        source = resolve_labelled_source(config.data, run.workdir, seed=config.seed)
        options = {"source": source, "data_dir": config.data.data_dir or None,
                   "download": config.data.download}
        classes = data.shared_classes(
            **options, splits=(config.data.train_split, config.data.eval_split))
        if len(classes) < 2:  # QA: one class trained at loss 0 and reported top-1 100
            raise BadDataError(
                f"{source} has {len(classes)} class(es) ({', '.join(classes) or 'none'}): "
                "classification needs at least 2 (a folder source: one sub-folder per class).")
        num_classes = len(classes)
        # The evaluation split is listed now (an empty class folder there is an error), not
        # at the first evaluation after an epoch of training (QA).
        data.num_examples(**options, split=config.data.eval_split, with_labels=True)
        in_device_memory = None  # (images, labels) of a training split kept on the devices
        if config.eval_only:
            schedule, total_steps, eval_every = optax.constant_schedule(0.0), 0, 0
            num_examples = None  # no training data read
        else:
            if in_memory.use_on_device(config.data.on_device, devices=devices, **options,
                                       split=config.data.train_split):
                in_device_memory = in_memory.load_image_array(
                    **options, split=config.data.train_split, with_labels=True)
                num_examples = len(in_device_memory[0])
            else:
                num_examples = data.num_examples(**options, split=config.data.train_split,
                                                 with_labels=True)
            same_on_every_process(num_examples, "the number of training images")
            lengths = core_config.schedule_lengths(config, num_examples)
            total_steps = lengths["total_steps"]
            schedule = optim.warmup_cosine_schedule(
                peak_lr=peak_learning_rate(config), warmup_steps=lengths["warmup_steps"],
                total_steps=total_steps, min_lr=config.min_lr,
            )
            eval_every = config.eval_every_steps or int(
                round(config.eval_every_epochs * lengths["steps_per_epoch"])) or total_steps
            print(f"{num_examples} training images, {num_classes} classes, "
                  f"{lengths['steps_per_epoch']} steps/epoch, {total_steps} steps "
                  f"({lengths['warmup_steps']} warmup), peak lr {peak_learning_rate(config):.3g}, "
                  f"effective batch {config.batch_size} = {config.grad_accum_steps} "
                  f"micro-batch(es) of {config.batch_size // config.grad_accum_steps}.")

        # ------------------------------------------------------------- Model and state
        spec = model_spec(config, num_classes, recipe.global_pool)
        abstract = nnx.state(nnx.eval_shape(spec.build), recipe.trainable)
        tx = recipe.create_tx(config, abstract, schedule)
        graphdef, state, start_step = run.init_state(spec, tx, trainable=recipe.trainable,
                                                     num_examples=num_examples)
        if not start_step:
            state = initialise(config, spec, state, run.state_shardings)
        logger = run.start_logging(total_steps=max(total_steps, 1), start_step=start_step)
        evaluator = Evaluator(config, graphdef, run.mesh, source, run.workdir, logger)
        if config.eval_only:
            if not start_step and not config.init_from:
                print(f"WARNING: eval_only found no checkpoint in {run.workdir} and no init_from: "
                      "evaluating random weights.")
            return evaluator(start_step, state)

        # ------------------------------------------------------------- Train loop
        batches = train_batches(config, options, run.mesh, start_step, in_device_memory)
        step_fn = make_train_step(
            graphdef, recipe.make_loss_fn(config, num_classes, run.mesh.size), tx, schedule,
            grad_accum_steps=config.grad_accum_steps, trainable=recipe.trainable,
        )
        results: dict[str, Any] = {}

        def evaluate(step, state):
            results.update(evaluator(step, state))

        result = run.train(
            state, step_fn, batches, start_step=start_step, total_steps=total_steps,
            hooks=(loop.Hook(eval_every, evaluate, missed=lambda s: not run.evaluated_at(s)),),
            metadata_fn=lambda step: {"step": step, "images_seen": step * config.batch_size},
        )
        if result.step >= total_steps and not result.preempted:  # else the re-run does it
            if not results:  # the run had already finished: report its final evaluation again
                results.update(evaluator(result.step, result.state, log=False))
            with failing_together("writing the loss curve"):  # process 0
                logger.save_loss_curve()
            if config.get("export_official"):
                results["export"] = export(run.workdir, spec, graphdef, result.state)
    return with_step(results, result.step)


def train_batches(config, options: dict, mesh, start_step: int, in_device_memory):
    """The training batches: on the devices (`in_device_memory` = (images, labels)) or from
    the tf.data pipeline (with `data.device_resize_canvas`, resized on the devices)."""
    from mae_jax.data import images as data

    clipped = config.data.crop_style == "clipped"
    if in_device_memory is not None:
        images, labels = in_device_memory
        then = f", RandAugment {config.data.randaugment}" if config.data.randaugment else ""
        unused = (f" (data.device_resize_canvas={config.data.device_resize_canvas} unused)"
                  if config.data.device_resize_canvas else "")
        print(f"Input on device: {len(images)} images, {images.nbytes / 1e6:.0f} MB per device; "
              f"crop, flip{then} there{unused}.")
        return OnDeviceIterator(
            images, labels=labels, mesh=mesh, image_size=config.model.image_size,
            global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
            crop_scale=tuple(config.data.crop_scale), randaugment=config.data.randaugment,
            crop_clipped=clipped)
    batches = data.create_train_iterator(
        **options,
        split=config.data.train_split,
        image_size=config.model.image_size,
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        shuffle_buffer_size=config.data.shuffle_buffer_size,
        crop_scale=tuple(config.data.crop_scale),
        crop_clipped=clipped,
        with_labels=True,
        randaugment=config.data.randaugment or None,
        device_resize_canvas=config.data.device_resize_canvas,
    )
    return resize_on_devices(batches, canvas=config.data.device_resize_canvas, mesh=mesh,
                             image_size=config.model.image_size,
                             randaugment=config.data.randaugment)


def export(workdir: str, spec: ModelSpec, graphdef, state: TrainState) -> dict[str, str]:
    """export/mae_finetuned.pth (official models_vit keys, when torch is installed) and
    export/classifier_flax/ (a Flax export that `mae_jax.weights.load.load_model` reads)."""
    from mae_jax.weights.load import save_export

    params, rest = state.params, state.rest
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
    model = nnx.merge(graphdef, params, rest)
    export_dir = os.path.join(workdir, "export")
    paths = {"flax": save_export(model, spec, os.path.join(export_dir, "classifier_flax"))}
    if jax.process_index() == 0:
        try:
            paths["pth"] = transfer.save_official_classifier(
                model, os.path.join(export_dir, "mae_finetuned.pth"))
        except ImportError as error:
            print(f"Skipping the .pth export: {error}")
    return paths
