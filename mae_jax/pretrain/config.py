"""MAE pretraining configs: the defaults every configs/*.py starts from, and their checks.
No JAX at import (configs load while the command line is parsed)."""

from __future__ import annotations

import ml_collections

from mae_jax.core import config as core_config
from mae_jax.models.variants import DEFAULT_DECODER, check_mask_ratio


def defaults() -> ml_collections.ConfigDict:
    """The official MAE pretraining recipe (ViT-Base on ImageNet-1K) as a starting point."""
    config = ml_collections.ConfigDict()
    config.task = "pretrain"  # Run with train.py.
    config.seed = 0  # Parameters, data order, augmentation and masks all follow from it.

    config.model = ml_collections.ConfigDict()
    config.model.variant = "vit_base_patch16"  # A name in mae_jax.VARIANTS.
    core_config.encoder_fields(config.model)  # Optional overrides of the variant's sizes.
    config.model.image_size = 224  # Square input size; a multiple of the patch size.
    config.model.decoder_embed_dim = DEFAULT_DECODER["decoder_embed_dim"]  # Ablation: 128-1024.
    config.model.decoder_depth = DEFAULT_DECODER["decoder_depth"]  # Paper ablation: 1-12.
    config.model.decoder_num_heads = DEFAULT_DECODER["decoder_num_heads"]
    config.model.norm_pix_loss = False  # Per-patch normalised pixels as target.
    config.model.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params stay float32).
    config.model.attention_impl = "auto"  # auto (cuDNN fused on GPU in 16-bit) | xla | cudnn.

    config.mask_ratio = 0.75  # Fraction of patches removed per image.

    config.data = ml_collections.ConfigDict()
    config.data.source = "tfds:imagenet2012"  # tfds:NAME | folder:/path | generated:N (offline).
    config.data.data_dir = ""  # TFDS data_dir ("" = TFDS default).
    config.data.split = "train"  # TFDS split (split syntax allowed) | folder: train/val sub-folder.
    config.data.download = True  # Let TFDS download and prepare if missing.
    config.data.shuffle_buffer_size = 50_000  # TFDS records held for shuffling (folders: all).
    config.data.generated_size = 64  # Image side for generated:N sources.
    config.data.augment = True  # Random resized crop + flip; False: resize + centre crop.
    # Decode the whole split once and augment on the devices (same crop distribution):
    # auto = when the images share one size and take < 25% of device memory (CIFAR), on GPUs.
    config.data.on_device = "auto"  # auto | always | never
    # Files (folder:/tfds:) not held on the devices: > 0 = the host decodes each crop window
    # into a canvas of this side and the devices resize + flip it (same images to rounding;
    # ~2x the host's images/s). Windows larger than the canvas are resized on the host.
    # 0 = resize on the host. ImageNet (<= 500 px sides mostly): 512.
    config.data.device_resize_canvas = 0

    config.batch_size = 4096  # Global images per optimizer step (the effective batch).
    config.grad_accum_steps = 1  # Micro-batches per step: batch_size / this fit in memory.
    config.base_lr = 1.5e-4  # Peak lr = base_lr * batch_size / 256 ...
    config.lr = 0.0  # ... unless this absolute peak lr is > 0.
    config.min_lr = 0.0  # Cosine floor.
    config.b1 = 0.9  # AdamW beta1.
    config.b2 = 0.95  # AdamW beta2.
    config.weight_decay = 0.05  # Not applied to biases and 1-D params.
    config.clip_grad_norm = 0.0  # Global-norm clipping; 0 disables.
    config.num_epochs = 800  # Training length in epochs ...
    config.total_steps = 0  # ... or in optimizer steps when > 0.
    config.warmup_epochs = 40.0  # Linear warmup length in epochs ...
    config.warmup_steps = 0  # ... or in steps when > 0.

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # Data-parallel axis size; -1: all devices left.
    config.mesh.fsdp = 1  # Parameter/optimizer sharding axis size.
    # CPU backend only: 0 = JAX's one CPU device; N = the CPU as N devices (README).
    config.mesh.cpu_devices = 0

    config.log_every_steps = 50  # Progress line, metrics.jsonl, TensorBoard.
    config.checkpoint_every_steps = 1000  # Orbax checkpoint cadence (also at end / SIGTERM).
    config.keep_checkpoints = 3  # Newest checkpoints kept.
    config.visualize_every_steps = 1000  # Reconstruction grid cadence; 0 disables.
    config.num_visualize_images = 8  # Fixed validation images in the grid.
    config.export_encoder = True  # At the end: export/encoder.pth + export/encoder_flax.
    config.tensorboard = True  # Write TensorBoard event files.
    # "A:B": a jax.profiler trace of steps A + 1 to B in workdir/profile ("" = none).
    config.profile_steps = ""
    # k-NN monitor of the encoder (weighted k-NN, k 20, T 0.07) on a labelled subset of
    # knn.source (default: data.source); knn.every_steps = 0 turns it off.
    config.knn = knn_defaults()
    return config


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> None:
    """Config-file argument for the paper's decoder ablation: decoder_depth=N,decoder_width=W."""
    values = core_config.parse_arg(arg)
    unknown = set(values) - {"decoder_depth", "decoder_width", "decoder_heads"}
    if unknown:
        raise core_config.ConfigError(
            f"Unknown config argument(s) {sorted(unknown)}; use decoder_depth=N,decoder_width=W."
        )
    if "decoder_depth" in values:
        config.model.decoder_depth = core_config.int_arg(values, "decoder_depth")
    if "decoder_width" in values:
        config.model.decoder_embed_dim = core_config.int_arg(values, "decoder_width")
        # Keep 32-wide heads (512/16) as the paper's sweeps do.
        config.model.decoder_num_heads = max(1, config.model.decoder_embed_dim // 32)
    if "decoder_heads" in values:
        config.model.decoder_num_heads = core_config.int_arg(values, "decoder_heads")


def check_config(config: ml_collections.ConfigDict, *, num_devices: int | None,
                 num_processes: int | None):
    """Every impossible combination, reported together before any data or compile work (the
    device and process counts None: all but what depends on them, `core.config.check_early`)."""
    core_config.check_task(config, "pretrain")
    problems: list[str] = []
    model = config.model
    dims = core_config.check_model(model, problems)
    if dims and model.image_size % dims["patch_size"] == 0:
        if isinstance(config.mask_ratio, float) and 0 < config.mask_ratio < 1:
            if int((model.image_size // dims["patch_size"]) ** 2 * (1 - config.mask_ratio)) < 1:
                problems.append(f"mask_ratio {config.mask_ratio} keeps no patch")
    if model.decoder_embed_dim % model.decoder_num_heads:
        problems.append(
            f"decoder_embed_dim {model.decoder_embed_dim} is not divisible by "
            f"decoder_num_heads {model.decoder_num_heads}"
        )
    try:
        check_mask_ratio(config.mask_ratio)
    except ValueError as error:
        problems.append(str(error))
    core_config.check_batch(config, problems, num_devices=num_devices,
                            num_processes=num_processes)
    core_config.check_run(config, problems)
    core_config.check_schedule(config, problems)
    core_config.check_source(config.data.source, problems)
    core_config.check_on_device(config, problems)
    core_config.check_device_resize(config, problems, host_only="" if config.data.augment
                                    else "data.augment=False (resize + centre crop)")
    check_knn(config.knn, problems, num_devices=num_devices)
    if config.num_epochs <= 0 and config.total_steps <= 0:
        problems.append("set num_epochs > 0 or total_steps > 0")
    if config.base_lr <= 0 and config.lr <= 0:
        problems.append("set base_lr > 0 (scaled by batch_size/256) or an absolute lr > 0")
    core_config.check_learning_rates(config, problems)
    core_config.raise_problems(problems)


def knn_defaults() -> ml_collections.ConfigDict:
    """`config.knn`: the k-NN monitor (`mae_jax.classification.knn`; every_steps 0: off)."""
    knn = ml_collections.ConfigDict()
    knn.every_steps = 0  # Run the monitor every N steps (and at the end); 0 disables it.
    knn.source = ""  # Labelled data ("" = config.data.source): tfds:NAME | folder:PATH.
    knn.train_split = "train"  # Memory bank split ...
    knn.eval_split = "validation"  # ... and query split (tfds:cifar100: "test"; folders "val").
    knn.num_train = 4096  # Memory bank size (examples spread over the split).
    knn.num_eval = 1024  # Queries.
    knn.k = 20  # Neighbours.
    knn.temperature = 0.07  # Vote weights exp(similarity / temperature).
    knn.batch_size = 256  # Global images per encoder forward.
    return knn


def check_knn(knn: ml_collections.ConfigDict, problems: list[str], *, num_devices: int | None):
    if knn.every_steps <= 0:
        return
    if knn.num_train < knn.k:
        problems.append(f"knn.num_train {knn.num_train} must be >= knn.k {knn.k}")
    if knn.num_eval < 1 or knn.k < 1 or knn.temperature <= 0:
        problems.append("knn.num_eval and knn.k must be >= 1, knn.temperature > 0")
    if knn.source:
        core_config.check_source(knn.source, problems, "knn.source")
    core_config.multiple_of_devices("knn.batch_size", knn.batch_size, num_devices, problems)
