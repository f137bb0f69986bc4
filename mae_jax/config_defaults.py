"""Default config trees; the files in configs/ start from these and change what they need."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None) -> dict[str, str]:
    """'decoder_depth=4,decoder_width=256' -> {'decoder_depth': '4', 'decoder_width': '256'}."""
    out = {}
    for item in (arg or "").split(","):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"Config argument {item!r} is not key=value.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def pretrain_defaults() -> ml_collections.ConfigDict:
    """The official MAE pretraining recipe (ViT-Base on ImageNet-1K) as a starting point."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Parameters, data order, augmentation and masks all follow from it.

    config.model = ml_collections.ConfigDict()
    config.model.variant = "vit_base_patch16"  # A name in mae_jax.VARIANTS.
    config.model.image_size = 224  # Square input size; a multiple of the patch size.
    config.model.patch_size = 0  # 0: the variant's.
    config.model.embed_dim = 0  # 0: the variant's encoder width.
    config.model.depth = 0  # 0: the variant's encoder depth.
    config.model.num_heads = 0  # 0: the variant's head count.
    config.model.decoder_embed_dim = 512  # Decoder width (paper ablation: 128-1024).
    config.model.decoder_depth = 8  # Decoder blocks (paper ablation: 1-12).
    config.model.decoder_num_heads = 16  # Decoder heads.
    config.model.norm_pix_loss = False  # Per-patch normalised pixels as target.
    config.model.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params stay float32).
    config.model.attention_impl = "auto"  # auto (cuDNN fused on GPU in 16-bit) | xla | cudnn.

    config.mask_ratio = 0.75  # Fraction of patches removed per image.

    config.data = ml_collections.ConfigDict()
    config.data.source = "tfds:imagenet2012"  # tfds:NAME | folder:/path | generated:N (offline).
    config.data.data_dir = ""  # TFDS data_dir ("" = TFDS default).
    config.data.split = "train"  # TFDS split (split syntax allowed, e.g. train[:90%]).
    config.data.download = True  # Let TFDS download and prepare if missing.
    config.data.shuffle_buffer_size = 50_000  # Encoded records held for shuffling.
    config.data.generated_size = 64  # Image side for generated:N sources.
    config.data.augment = True  # Random resized crop + flip; False: resize + centre crop.

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

    config.log_every_steps = 50  # Progress line, metrics.jsonl, TensorBoard.
    config.checkpoint_every_steps = 1000  # Orbax checkpoint cadence (also at end / SIGTERM).
    config.keep_checkpoints = 3  # Newest checkpoints kept.
    config.visualize_every_steps = 1000  # Reconstruction grid cadence; 0 disables.
    config.num_visualize_images = 8  # Fixed validation images in the grid.
    config.export_encoder = True  # At the end: export/encoder.pth + export/encoder_flax.
    config.tensorboard = True  # Write TensorBoard event files.
    return config


def apply_decoder_arg(config: ml_collections.ConfigDict, arg: str | None) -> None:
    """Config-file argument for the paper's decoder ablation: decoder_depth=N,decoder_width=W."""
    values = parse_arg(arg)
    unknown = set(values) - {"decoder_depth", "decoder_width", "decoder_heads"}
    if unknown:
        raise ValueError(
            f"Unknown config argument(s) {sorted(unknown)}; use decoder_depth=N,decoder_width=W."
        )
    if "decoder_depth" in values:
        config.model.decoder_depth = int(values["decoder_depth"])
    if "decoder_width" in values:
        config.model.decoder_embed_dim = int(values["decoder_width"])
        # Keep 32-wide heads (512/16) as the paper's sweeps do.
        config.model.decoder_num_heads = max(1, int(values["decoder_width"]) // 32)
    if "decoder_heads" in values:
        config.model.decoder_num_heads = int(values["decoder_heads"])


def segment_defaults() -> ml_collections.ConfigDict:
    """mmsegmentation's MAE ViT-B/16 + UPerNet recipe on ADE20K at 512x512 (160k iterations)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.variant = "vit_base_patch16"  # Backbone size (a name in mae_jax.VARIANTS).
    config.model.image_size = 512  # Training crop / window size; pos embeds resized to it.
    config.model.patch_size = 0  # 0: the variant's (likewise the next three).
    config.model.embed_dim = 0
    config.model.depth = 0
    config.model.num_heads = 0
    config.model.out_indices = (3, 5, 7, 11)  # Blocks feeding the 4 pyramid levels.
    config.model.drop_path_rate = 0.1  # Stochastic depth, linear over the blocks.
    config.model.layer_scale_init = 1.0  # Layer scale init (mmseg); 0 disables layer scale.
    config.model.relative_position_bias = True  # BEiT-style, zero-initialised (mmseg's MAE).
    config.model.channels = 768  # UPerNet channels.
    config.model.aux_channels = 256  # Auxiliary FCN head channels.
    config.model.dropout = 0.1  # Dropout before both classifiers.
    config.model.dtype = "float32"  # Compute dtype: float32 | bfloat16.
    config.model.attention_impl = "auto"

    # Encoder initialisation: "" = random, a .pth (official MAE format), or a train.py workdir.
    config.init_from = ""

    config.data = ml_collections.ConfigDict()
    config.data.source = "ade20k"  # ade20k | synthetic (generated scenes, offline).
    config.data.data_dir = ""  # Where the prepared ade20k_semantic TFDS data lives.
    config.data.manual_dir = ""  # Folder holding ADEChallengeData2016(.zip), to prepare once.
    config.data.num_classes = 0  # synthetic: number of classes (0 = its default).
    config.data.scene_size = 64  # synthetic: scene side in pixels.
    config.data.num_examples = 0  # synthetic: training scenes (0 = its default).
    config.data.scale = (2048, 512)  # mmseg img_scale: resize target (long, short).
    config.data.ratio_range = (0.5, 2.0)  # Random rescale range for training.
    config.data.eval_limit = 0  # Evaluate on the first N validation images (0 = all).

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

    config.eval_every_steps = 16_000  # Sliding-window evaluation cadence (and at the end).
    config.eval_window = 512  # Sliding window size.
    config.eval_stride = 341  # Sliding window stride.
    config.num_pictures = 4  # Validation images drawn as image | prediction | ground truth.
    config.eval_only = False  # Evaluate init_from / the newest checkpoint, no training.

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1

    config.log_every_steps = 50
    config.checkpoint_every_steps = 4000
    config.keep_checkpoints = 3
    config.tensorboard = True
    return config
