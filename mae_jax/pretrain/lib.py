"""MAE pretraining: `train_and_evaluate(config, workdir)` behind `train.py`.

The shared core (`mae_jax.core`) runs the mesh, state, checkpoints, logging and loop; this
module supplies what is MAE's own: the model, the masked-reconstruction loss, the input stream,
the reconstruction pictures and the encoder export.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mae_jax.core import config as core_config
from mae_jax.core import loop, optim
from mae_jax.core.processes import failing_together, same_on_every_process
from mae_jax.core.run import Run
from mae_jax.core.run_logging import RunLogger
from mae_jax.core.step import make_train_step
from mae_jax.data.constants import normalize_uint8
from mae_jax.data.device_resize import resize_on_devices
from mae_jax.data.on_device import OnDeviceIterator
from mae_jax.models.factory import ModelSpec
from mae_jax.pretrain.config import check_config
from mae_jax.visualize import figure_rows, reconstruct
from mae_jax.weights.load import save_export
from mae_jax.weights.official import save_official


def model_spec(model: ml_collections.ConfigDict) -> ModelSpec:
    """The MAE of `config.model`: the variant's encoder with explicit overrides."""
    return ModelSpec("MAE", {
        **core_config.encoder_dims(model),
        "image_size": model.image_size,
        "decoder_embed_dim": model.decoder_embed_dim,
        "decoder_depth": model.decoder_depth,
        "decoder_num_heads": model.decoder_num_heads,
        "norm_pix_loss": model.norm_pix_loss,
        "dtype": model.dtype,
        "attention_impl": model.attention_impl or None,
    })


def create_tx(config, schedule):
    """AdamW (0.9, 0.95), wd 0.05 off biases and 1-D params; optional clipping."""
    return optim.create_optimizer(
        learning_rate=schedule,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        weight_decay_mask=optim.weight_decay_mask,
        clip_grad_norm=config.clip_grad_norm or None,
    )


def peak_learning_rate(config) -> float:
    if config.lr > 0:
        return float(config.lr)
    return optim.scale_learning_rate(config.base_lr, config.batch_size)


def make_loss_fn(mask_ratio: float):
    """loss_fn(model, batch, rng): MSE on the removed patches; masks drawn from `rng`
    (`MAE.loss`: the decoder's last block on the removed patches only)."""

    def loss_fn(model, batch, rng):
        return model.loss(normalize_uint8(batch["image"]), rng=rng, mask_ratio=mask_ratio), {}

    return loss_fn


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices=None
) -> dict[str, Any]:
    """Pretrains (or resumes) an MAE in `workdir`; returns the last logged metrics and step.

    devices: the devices of the mesh (default: all devices of all processes).
    """
    from mae_jax.data import images as data  # TensorFlow: input pipeline only
    from mae_jax.data import in_memory
    from mae_jax.data.generated import resolve_source

    devices = list(devices or jax.devices())
    check_config(config, num_devices=len(devices), num_processes=jax.process_count())
    with Run(config, workdir, devices=devices) as run:
        # ------------------------------------------------------------- Data and schedule
        source = resolve_source(config.data, run.workdir, seed=config.seed)
        data_dir = config.data.data_dir or None
        where = {"source": source, "data_dir": data_dir, "split": config.data.split,
                 "download": config.data.download}
        # Datasets that fit in device memory are decoded once and augmented on the devices.
        in_device_memory = None
        if in_memory.use_on_device(config.data.on_device, devices=devices, **where):
            in_device_memory = in_memory.load_image_array(**where)
            num_examples = len(in_device_memory)
        else:
            num_examples = data.num_examples(**where)
        same_on_every_process(num_examples, "the number of training images")
        lengths = core_config.schedule_lengths(config, num_examples)
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

        # ------------------------------------------------------------- Model and state
        spec = model_spec(config.model)
        tx = create_tx(config, schedule)
        graphdef, state, start_step = run.init_state(spec, tx, num_examples=num_examples)
        logger = run.start_logging(total_steps=total_steps, start_step=start_step)
        if in_device_memory is not None:
            batches = OnDeviceIterator(
                in_device_memory, mesh=run.mesh, image_size=config.model.image_size,
                global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
                augment=config.data.augment,
            )
            unused = (f" (data.device_resize_canvas={config.data.device_resize_canvas} unused)"
                      if config.data.device_resize_canvas else "")
            print(f"Input on device: {len(in_device_memory)} images, "
                  f"{in_device_memory.nbytes / 1e6:.0f} MB per device; crop, flip there"
                  f"{unused}.")
        else:
            batches = data.create_pretrain_iterator(
                **where,
                image_size=config.model.image_size,
                global_batch_size=config.batch_size,
                seed=config.seed,
                start_step=start_step,
                shuffle_buffer_size=config.data.shuffle_buffer_size,
                augment=config.data.augment,
                device_resize_canvas=config.data.device_resize_canvas,
            )
            batches = resize_on_devices(batches, canvas=config.data.device_resize_canvas,
                                        mesh=run.mesh, image_size=config.model.image_size)
        hooks = []
        if config.visualize_every_steps > 0 and config.num_visualize_images > 0:
            hooks.append(loop.Hook(
                config.visualize_every_steps,
                reconstruction_hook(config, graphdef, source, data_dir, logger),
                # A stop before them, or a failure after the checkpoint: the resume draws them.
                missed=lambda step: not run.pictures_at("reconstruction", step),
            ))
        if config.knn.every_steps > 0:
            from mae_jax.classification.knn import make_knn_hook

            hooks.append(loop.Hook(config.knn.every_steps, make_knn_hook(
                config.knn, graphdef=graphdef, mesh=run.mesh, logger=logger, source=source,
                image_size=config.model.image_size, data_dir=data_dir,
                download=config.data.download, workdir=run.workdir, seed=config.seed,
            ), missed=lambda step: not run.evaluated_at(step)))
        step_fn = make_train_step(
            graphdef, make_loss_fn(config.mask_ratio), tx, schedule,
            grad_accum_steps=config.grad_accum_steps,
        )

        # ------------------------------------------------------------- Train loop
        result = run.train(
            state, step_fn, batches, start_step=start_step, total_steps=total_steps,
            hooks=tuple(hooks),
            metadata_fn=lambda step: {"step": step, "images_seen": step * config.batch_size},
        )
        # The metrics of the last log step, named as such when the run stopped after it (QA:
        # "step 65" beside step 50's loss).
        out: dict[str, Any] = {"total_steps": total_steps, "step": result.step, **(
            {"metrics_of_step": result.metrics_step} if result.metrics and
            result.metrics_step != result.step else {}), **result.metrics}
        # ------------------------------------------------------------- Export
        if result.step >= total_steps and not result.preempted:  # else the re-run does it
            if config.export_encoder:
                out["export"] = export_encoder(run.workdir, spec, graphdef, result.state)
            with failing_together("writing the loss curve"):  # process 0
                out["loss_curve"] = logger.save_loss_curve()
    return out


def export_encoder(workdir: str, spec: ModelSpec, graphdef, state) -> dict[str, str]:
    """export/encoder.pth and export/mae_full.pth (official layout, when torch is installed)
    and export/encoder_flax/ (a Flax export that `mae_jax.weights.load.load_model` reads)."""
    params, rest = state.params, state.rest
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
    model = nnx.merge(graphdef, params, rest)
    export_dir = os.path.join(workdir, "export")
    paths = {}
    encoder_kwargs = {k: v for k, v in spec.kwargs.items()
                      if not k.startswith("decoder_") and k != "norm_pix_loss"}
    paths["flax"] = save_export(
        model.encoder, ModelSpec("ViTEncoder", encoder_kwargs),
        os.path.join(export_dir, "encoder_flax"),
    )
    with failing_together(f"writing the .pth export in {export_dir}"):
        if jax.process_index() == 0:
            try:
                save_official(model.encoder, os.path.join(export_dir, "encoder.pth"))
                save_official(model, os.path.join(export_dir, "mae_full.pth"))
                paths["pth"] = os.path.join(export_dir, "encoder.pth")
            except ImportError as error:
                print(f"Skipping the .pth export: {error}")
    return paths


def reconstruction_hook(config, graphdef, source, data_dir, logger: RunLogger):
    """Every N steps: masked | reconstruction | pasted | original for fixed images."""
    from mae_jax.data import images as data

    images = normalize_uint8(jnp.asarray(data.load_fixed_images(
        source=source, image_size=config.model.image_size,
        count=config.num_visualize_images, data_dir=data_dir,
        download=config.data.download,
    )))
    patch = core_config.encoder_dims(config.model)["patch_size"]
    num_patches = (config.model.image_size // patch) ** 2
    # The same masks at every call, so figures over training are comparable.
    noise = jax.random.uniform(jax.random.PRNGKey(config.seed + 2), (images.shape[0], num_patches))

    @jax.jit
    def run(params, rest):
        model = nnx.merge(graphdef, params, rest)
        return reconstruct(model, images, noise=noise, mask_ratio=config.mask_ratio)

    def hook(step, state):
        # Gathered, not device_get: with parameters sharded over several hosts (fsdp) the
        # partitioner may shard the pictures too, and device_get refuses such arrays.
        from jax.experimental import multihost_utils

        parts = multihost_utils.process_allgather(run(state.params, state.rest), tiled=True)
        with failing_together(f"writing the reconstructions of step {step}"):  # process 0
            logger.log_images(step, {"reconstruction": figure_rows(parts)})

    return hook
