"""Segmentation configs: mmsegmentation's MAE + UPerNet recipe as defaults, and their checks."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mae_jax.core import config as core_config
from mae_jax.data.seg_sources import ADE20K_NUM_CLASSES


def defaults() -> ml_collections.ConfigDict:
    """mmsegmentation's MAE ViT-B/16 + UPerNet recipe on ADE20K at 512x512 (160k iterations)."""
    config = ml_collections.ConfigDict()
    config.task = "segment"  # Run with segment.py.
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.variant = "vit_base_patch16"  # Backbone size (a name in mae_jax.VARIANTS).
    config.model.image_size = 512  # Training crop / window size; pos embeds resized to it.
    core_config.encoder_fields(config.model)  # Optional overrides of the variant's sizes.
    config.model.out_indices = (3, 5, 7, 11)  # Blocks feeding the 4 pyramid levels.
    config.model.drop_path_rate = 0.1  # Stochastic depth, linear over the blocks.
    config.model.layer_scale_init = 1.0  # Layer scale init (mmseg); 0 disables layer scale.
    config.model.relative_position_bias = True  # BEiT-style, zero-initialised (mmseg's MAE).
    config.model.channels = 768  # UPerNet channels.
    config.model.aux_channels = 256  # Auxiliary FCN head channels.
    config.model.dropout = 0.1  # Dropout before both classifiers.
    config.model.dtype = "float32"  # Compute dtype: float32 | bfloat16.
    config.model.attention_impl = "auto"

    # Initialisation: "" = random; an official MAE .pth, HF folder or train.py run (the encoder);
    # mmseg's published MAE UPerNet .pth or a segment.py run (the whole segmenter).
    config.init_from = ""

    config.data = ml_collections.ConfigDict()
    config.data.source = "ade20k"  # ade20k | synthetic (generated scenes, offline).
    config.data.data_dir = ""  # Where the prepared ade20k_semantic TFDS data lives.
    config.data.manual_dir = ""  # Folder holding ADEChallengeData2016(.zip), to prepare once.
    config.data.num_classes = config_dict.placeholder(int)  # synthetic: classes (None: 8).
    config.data.scene_size = 64  # synthetic: scene side in pixels.
    config.data.num_examples = config_dict.placeholder(int)  # synthetic: scenes (None: 1024).
    config.data.scale = (2048, 512)  # mmseg img_scale: resize target (long, short).
    config.data.ratio_range = (0.5, 2.0)  # Random rescale range for training.
    config.data.eval_limit = 0  # Evaluate on the first N validation images (0 = all).
    # Photometric distortion (mmseg's, exact) inside the jitted train step instead of on the
    # host: its HSV round trips cost the host ~20 ms an image, a GPU next to nothing.
    config.data.device_photometric = True

    config.batch_size = 16  # Global batch (mmseg: 8 GPUs x 2).
    config.lr = 1e-4  # Peak learning rate (AdamW).
    config.b1 = 0.9
    config.b2 = 0.999
    config.weight_decay = 0.05
    config.layer_decay = 0.65  # Layer-wise lr decay over the backbone blocks.
    config.warmup_steps = 1500  # Linear warmup (from lr * 1e-6) ...
    config.total_steps = 160_000  # ... then poly decay to min_lr at this step.
    config.poly_power = 1.0
    config.min_lr = 0.0
    config.aux_weight = 0.4  # Auxiliary FCN loss weight.
    config.clip_grad_norm = 0.0  # 0: no clipping.

    config.eval_every_steps = 16_000  # Sliding-window evaluation cadence and at the end (0: never).
    config.eval_window = 512  # Sliding window size.
    config.eval_stride = 341  # Sliding window stride.
    config.num_pictures = 4  # Validation images drawn as image | prediction | ground truth.
    config.eval_only = False  # Evaluate init_from / the newest checkpoint, no training.
    # At the end of training also write export/segmenter_mmseg.pth (mmseg's layout; needs torch).
    config.export_mmseg = True

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.cpu_devices = 0  # CPU backend only: the CPU as N devices (README).

    config.log_every_steps = 50
    config.checkpoint_every_steps = 4000
    config.keep_checkpoints = 3
    config.tensorboard = True
    # "A:B": a jax.profiler trace of steps A + 1 to B in workdir/profile ("" = none).
    config.profile_steps = ""
    return config


def check_config(config, *, num_devices: int | None, num_processes: int | None) -> None:
    """Every impossible combination, reported together before any data or compile work (the
    device and process counts None: all but what depends on them, `core.config.check_early`)."""
    core_config.check_task(config, "segment")
    problems: list[str] = []
    model = config.model
    dims = core_config.check_model(model, problems)
    if dims:
        grid = model.image_size // dims["patch_size"]
        if model.image_size % dims["patch_size"] == 0 and grid % 2:
            problems.append(
                f"model.image_size / patch = {grid} must be even (the neck's 0.5x level "
                "max-pools by 2)"
            )
        depth = dims["depth"]
        if len(model.out_indices) != 4 or not all(0 <= i < depth for i in model.out_indices):
            problems.append(f"model.out_indices {model.out_indices} must be 4 blocks < {depth}")
    core_config.check_batch(config, problems, num_devices=num_devices,
                            num_processes=num_processes)
    core_config.check_run(config, problems)
    if config.warmup_steps >= config.total_steps and not config.eval_only:
        problems.append(
            f"warmup_steps {config.warmup_steps} must be < total_steps {config.total_steps}"
        )
    if config.eval_window != model.image_size:
        problems.append(
            f"eval_window {config.eval_window} must equal model.image_size {model.image_size} "
            "(the window is what the model sees)"
        )
    if not 1 <= config.eval_stride <= config.eval_window:
        problems.append(f"eval_stride {config.eval_stride} must be in [1, eval_window "
                        f"{config.eval_window}] (windows must cover the image)")
    check_numbers(config, problems)
    if config.data.source not in ("ade20k", "synthetic"):
        problems.append(f"data.source {config.data.source!r} must be 'ade20k' or 'synthetic'")
    elif config.data.source == "ade20k" and config.data.num_classes not in (
        None, ADE20K_NUM_CLASSES
    ):
        problems.append(
            f"data.num_classes {config.data.num_classes} with data.source='ade20k': ADE20K has "
            "150 classes; leave data.num_classes unset (it only configures 'synthetic')"
        )
    core_config.raise_problems(problems)


def check_numbers(config, problems: list[str]) -> None:
    """The optimiser, loss and model numbers (each would fail deep inside the run)."""
    model, data = config.model, config.data
    if not config.lr > 0:
        problems.append(f"lr {config.lr} must be > 0")
    elif not 0 <= config.min_lr <= config.lr:
        problems.append(f"min_lr {config.min_lr} must be in [0, lr {config.lr}]")
    if not 0 < config.layer_decay <= 1:
        problems.append(f"layer_decay {config.layer_decay} must be in (0, 1]")
    for name in ("b1", "b2"):
        if not 0 <= config[name] < 1:
            problems.append(f"{name} {config[name]} must be in [0, 1)")
    for name in ("weight_decay", "aux_weight", "clip_grad_norm", "poly_power", "warmup_steps"):
        if config[name] < 0:
            problems.append(f"{name} {config[name]} must be >= 0")
    for name in ("drop_path_rate", "dropout"):
        if not 0 <= model[name] < 1:
            problems.append(f"model.{name} {model[name]} must be in [0, 1)")
    for name in ("channels", "aux_channels"):
        if model[name] < 1:
            problems.append(f"model.{name} {model[name]} must be >= 1")
    if len(data.scale) != 2 or min(data.scale) < 1:
        problems.append(f"data.scale {tuple(data.scale)} must be (long side, short side) >= 1")
    if len(data.ratio_range) != 2:
        problems.append(f"data.ratio_range {tuple(data.ratio_range)} must be two numbers (low, "
                        "high)")
    elif not 0 < data.ratio_range[0] <= data.ratio_range[1]:
        problems.append(f"data.ratio_range {tuple(data.ratio_range)} must be (low, high) with "
                        "0 < low <= high")
    if data.source == "synthetic":
        if data.num_classes is not None and not 2 <= data.num_classes <= 254:
            problems.append(f"data.num_classes {data.num_classes} must be in [2, 254] (labels "
                            "are uint8 below the ignore value 255)")
        if data.num_examples is not None and data.num_examples < config.batch_size:
            problems.append(f"data.num_examples {data.num_examples} must be >= batch_size "
                            f"{config.batch_size} (one batch)")
