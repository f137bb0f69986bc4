"""Classification configs: the official linear-probe and fine-tuning recipes as defaults, the
per-model ImageNet values, and the checks run before any data or compile work."""

from __future__ import annotations

import ml_collections

from mae_jax.classification.textures import TEXTURES, TRAIN_SPLIT, VAL_SPLIT
from mae_jax.core import config as core_config

# Official per-model ImageNet values (FINETUNE.md): fine-tuning blr, layer decay, drop path and
# epochs; the linear probe shares blr 0.1, 90 epochs (FINETUNE.md: 50 suffice for L / H).
VARIANT_NAMES = {"base": "vit_base_patch16", "large": "vit_large_patch16",
                 "huge": "vit_huge_patch14"}
FINETUNE_RECIPES = {
    "vit_base_patch16": {"base_lr": 5e-4, "layer_decay": 0.65, "drop_path_rate": 0.1,
                         "num_epochs": 100},
    "vit_large_patch16": {"base_lr": 1e-3, "layer_decay": 0.75, "drop_path_rate": 0.2,
                          "num_epochs": 50},
    "vit_huge_patch14": {"base_lr": 1e-3, "layer_decay": 0.75, "drop_path_rate": 0.3,
                         "num_epochs": 50},
}
TASKS = ("linprobe", "finetune")
# RandomResizedCrop's box draws: "torchvision" (up to 10 draws of area and aspect, the first
# that fits the image, else a centre crop: MAE's pretraining and fine-tuning) or "clipped"
# (MAE's util/crop.py, after BYOL's TF code, its linear probe's: one draw, the width and height
# clipped to the image's, so a large draw is kept, cut to the image, where torchvision draws
# again: at scale (0.08, 1) on 500 x 375 images the mean crop is 0.52 of the image, not 0.43).
CROP_STYLES = ("torchvision", "clipped")


def defaults(task: str) -> ml_collections.ConfigDict:
    """`main_linprobe.py` (task "linprobe") or `main_finetune.py` ("finetune") for ViT-B on
    ImageNet-1K, with the effective batch sizes of FINETUNE.md (16384 / 1024)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    probe = task == "linprobe"
    config = ml_collections.ConfigDict()
    config.task = task  # Run with linprobe.py / finetune.py.
    config.seed = 0  # Head init, data order, augmentation, drop path and mixing follow from it.

    config.model = ml_collections.ConfigDict()
    config.model.variant = "vit_base_patch16"  # Encoder size (a name in mae_jax.VARIANTS).
    core_config.encoder_fields(config.model)  # Optional overrides of the variant's sizes.
    config.model.image_size = 224  # Input size; position embeddings are resized to it.
    config.model.drop_path_rate = 0.0 if probe else 0.1  # Stochastic depth (fine-tuning).
    config.model.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params stay float32).
    config.model.attention_impl = "auto"  # auto (cuDNN fused on GPU in 16-bit) | xla | cudnn.

    # Weights: "" = random (a baseline); an official mae_pretrain_vit_*.pth, a Hugging Face
    # ViTMAE folder or a train.py run directory (its encoder). With eval_only, also an official
    # mae_finetuned_vit_*.pth or a finetune.py run directory (the whole classifier).
    config.init_from = ""

    config.data = ml_collections.ConfigDict()
    config.data.source = "tfds:imagenet2012"  # tfds:NAME | folder:PATH (PATH/<split>/<class>/)
    #                                            | generated:N (offline, N labelled images).
    config.data.data_dir = ""  # TFDS data_dir ("" = TFDS default).
    config.data.download = True  # Let TFDS download and prepare if missing.
    config.data.train_split = "train"
    config.data.eval_split = "validation"  # tfds:cifar100 has "test"; folders use "val".
    config.data.shuffle_buffer_size = 50_000  # TFDS records held for shuffling (folders: all).
    config.data.crop_scale = (0.08, 1.0)  # RandomResizedCrop scale (torchvision's default).
    # How RandomResizedCrop draws its box (CROP_STYLES): the official probe's util/crop.py.
    config.data.crop_style = "clipped" if probe else "torchvision"
    # timm RandAugment policy ("" = off): fine-tuning uses rand-m9-mstd0.5-inc1.
    config.data.randaugment = "" if probe else "rand-m9-mstd0.5-inc1"
    # Eval: resize the shorter side to image_size / ratio, centre crop. 0 (fine-tuning): the
    # official rule for the model's size (`official_resize_ratio`); the probe's is fixed.
    config.data.resize_ratio = 224 / 256 if probe else 0.0
    # > 0 = the host decodes each training crop window into a canvas of this side and the
    # devices resize + flip it (train.py's option; larger windows are resized on the host),
    # then apply RandAugment's layers, whose random draws the host makes
    # (mae_jax.data.randaugment_device). The same images to rounding. Measured per host core:
    # the probe's crops at C = 384 2.11x the official transform's images/s (`bench_input.py
    # --probe`); fine-tuning's at C = 512 3.0x / 2.9x timm's transform on one / two cores,
    # against 1.1x / 1.0x with RandAugment on the host; on CIFAR's 32 px images at C = 224
    # 9.0x / 6.3x against 1.3x / 1.2x (`bench_finetune_input.py [--cifar]`). A batch of
    # canvases is C*C*3 bytes an image: at the probe's 16384 and C = 384, 7.2 GB on the host
    # and over the devices. 0 = all on the host.
    config.data.device_resize_canvas = 0
    # Decode the whole training split once and keep it on the devices, where the crop, flip and
    # RandAugment run (its draws made on the host per batch): auto = when the images share one
    # size and take < 25% of device memory (CIFAR), on GPUs; the example order differs from
    # the tf.data pipeline's (every example once an epoch). Evaluation stays on tf.data.
    config.data.on_device = "auto"  # auto | always | never
    config.data.generated_classes = 8  # generated:N sources: number of classes (<= 8) ...
    config.data.generated_size = 32  # ... and image side.

    config.batch_size = 16384 if probe else 1024  # Global images per optimizer step.
    config.grad_accum_steps = 16 if probe else 1  # Micro-batches per step (fit in memory).
    config.base_lr = 0.1 if probe else 5e-4  # Peak lr = base_lr * batch_size / 256 ...
    config.lr = 0.0  # ... unless this absolute peak lr is > 0.
    config.min_lr = 0.0 if probe else 1e-6  # Cosine floor.
    config.num_epochs = 90 if probe else 100  # Training length in epochs ...
    config.total_steps = 0  # ... or in optimizer steps when > 0.
    config.warmup_epochs = 10.0 if probe else 5.0  # Linear warmup in epochs ...
    config.warmup_steps = 0  # ... or in steps when > 0.
    config.weight_decay = 0.0 if probe else 0.05
    config.clip_grad_norm = 0.0  # Global-norm clipping; 0 disables (the official default).
    if probe:  # LARS (MoCo v3 / official util/lars.py) on the head only.
        config.momentum = 0.9
        config.trust_coefficient = 0.001
    else:  # AdamW with layer-wise lr decay; timm's Mixup / CutMix, label smoothing, erasing.
        config.b1 = 0.9
        config.b2 = 0.999
        config.layer_decay = 0.65
        config.label_smoothing = 0.1
        config.mixup = 0.8  # Mixup alpha; 0 disables.
        config.cutmix = 1.0  # CutMix alpha; 0 disables.
        config.mixup_prob = 1.0  # Probability of mixing a batch at all.
        config.mixup_switch_prob = 0.5  # Probability of CutMix when both are on.
        # Images per draw at most (`mixup_group`): the official code mixes each GPU's batch of
        # 32 on its own (its own lam, method and box, its images paired); 0 = the micro-batch.
        config.mixup_batch = 32
        config.reprob = 0.25  # Random erasing probability per image ...
        config.remode = "pixel"  # ... fill: pixel | rand | const ...
        config.recount = 1  # ... boxes per image.
        config.export_official = True  # At the end: export/mae_finetuned.pth (official keys).

    config.eval_every_epochs = 1.0  # Top-1 / top-5 on eval_split (the official: every epoch) ...
    config.eval_every_steps = 0  # ... or every N steps when > 0.
    config.eval_batch_size = 1024  # Global evaluation batch.
    config.eval_only = False  # Evaluate the newest checkpoint (or init_from), no training.

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # Data-parallel axis size; -1: all devices left.
    config.mesh.fsdp = 1  # Parameter/optimizer sharding axis size.
    # CPU backend only: 0 = JAX's one CPU device; N = the CPU as N devices (README).
    config.mesh.cpu_devices = 0

    config.log_every_steps = 50  # Progress line, metrics.jsonl, TensorBoard.
    config.checkpoint_every_steps = 1000  # Orbax checkpoint cadence (also at end / SIGTERM).
    config.keep_checkpoints = 3
    config.tensorboard = True
    # "A:B": a jax.profiler trace of steps A + 1 to B in workdir/profile ("" = none).
    config.profile_steps = ""
    return config


def apply_variant(config: ml_collections.ConfigDict, arg: str | None) -> None:
    """Config-file argument `variant=base|large|huge`: the official per-model values."""
    values = core_config.parse_arg(arg)
    unknown = set(values) - {"variant"}
    if unknown:
        raise core_config.ConfigError(
            f"Unknown config argument(s) {sorted(unknown)}; use variant=base|large|huge."
        )
    name = values.get("variant", "base")
    if name not in VARIANT_NAMES:
        raise core_config.ConfigError(
            f"variant={name!r}: use one of {', '.join(VARIANT_NAMES)}.")
    config.model.variant = VARIANT_NAMES[name]
    if config.task == "finetune":
        recipe = FINETUNE_RECIPES[config.model.variant]
        config.base_lr = recipe["base_lr"]
        config.layer_decay = recipe["layer_decay"]
        config.model.drop_path_rate = recipe["drop_path_rate"]
        config.num_epochs = recipe["num_epochs"]


def official_resize_ratio(image_size: int) -> float:
    """The official evaluation's crop ratio (MAE's util/datasets.py `build_transform`):
    crop_pct 224 / 256 up to 224 px, 1.0 above, i.e. at 384 or 448 px the shorter side is
    resized to the input size and nothing is cropped away."""
    return 224 / 256 if image_size <= 224 else 1.0


def resolve_resize_ratio(config: ml_collections.ConfigDict) -> None:
    """data.resize_ratio 0 -> `official_resize_ratio` of the model's size, before the run
    records its config (so the record holds the ratio the evaluation uses)."""
    if not config.data.resize_ratio:
        config.data.resize_ratio = official_resize_ratio(config.model.image_size)


def check_config(config: ml_collections.ConfigDict, *, task: str, num_devices: int | None,
                 num_processes: int | None) -> None:
    """Every impossible combination, reported together before any data or compile work (the
    device and process counts None: all but what depends on them, `core.config.check_early`)."""
    core_config.check_task(config, task)
    problems: list[str] = []
    core_config.check_model(config.model, problems)
    core_config.check_batch(config, problems, num_devices=num_devices,
                            num_processes=num_processes)
    core_config.check_run(config, problems)
    core_config.check_schedule(config, problems)
    core_config.multiple_of_devices("eval_batch_size", config.eval_batch_size, num_devices,
                                    problems)
    if not config.eval_only:
        if config.num_epochs <= 0 and config.total_steps <= 0:
            problems.append("set num_epochs > 0 or total_steps > 0")
        if config.base_lr <= 0 and config.lr <= 0:
            problems.append("set base_lr > 0 (scaled by batch_size/256) or an absolute lr > 0")
        core_config.check_learning_rates(config, problems)
    if len(config.data.crop_scale) != 2 or not (
            0 < config.data.crop_scale[0] <= config.data.crop_scale[-1] <= 1):
        problems.append(f"data.crop_scale {tuple(config.data.crop_scale)} must be (low, high) "
                        "with 0 < low <= high <= 1")
    if config.data.crop_style not in CROP_STYLES:
        problems.append(f"data.crop_style {config.data.crop_style!r} must be one of "
                        f"{', '.join(CROP_STYLES)}")
    if not 0 <= config.data.resize_ratio <= 1:
        problems.append(f"data.resize_ratio {config.data.resize_ratio} must be in (0, 1] (0: "
                        "the official fine-tuning rule for the image size)")
    core_config.check_device_resize(config, problems)
    core_config.check_source(config.data.source, problems)
    _check_generated(config.data, problems)
    core_config.check_on_device(config, problems)
    if task == "finetune":
        _check_finetune(config, problems)
    core_config.raise_problems(problems)


def _check_generated(data, problems: list[str]) -> None:
    """A `generated:N` source's settings, with the rest (QA: a traceback after JAX started,
    one problem at a time; `synthetic.resolve_labelled_source` checks them again)."""
    kind, _, count = str(data.source).partition(":")
    if kind != "generated" or not count.isdigit():
        return  # check_source names a bad N
    count = int(count)
    splits = (TRAIN_SPLIT, VAL_SPLIT, "validation")
    for name in ("train_split", "eval_split"):
        if data[name] not in splits:
            problems.append(f"data.{name} {data[name]!r}: generated data has the splits "
                            f"{TRAIN_SPLIT!r} and {VAL_SPLIT!r} ('validation' reads {VAL_SPLIT!r})")
    if not 2 <= data.generated_classes <= len(TEXTURES):
        problems.append(f"data.generated_classes {data.generated_classes} must be in [2, "
                        f"{len(TEXTURES)}] (the textures there are)")
    elif count < data.generated_classes:
        problems.append(f"data.source {data.source!r}: N must be >= data.generated_classes "
                        f"{data.generated_classes} (one training image per class)")


def mixup_group(batch: int, most: int, devices: int = 1) -> int:
    """Images per Mixup / CutMix draw in a micro-batch of `batch` (even) split over `devices`:
    each device's rows in the fewest equal runs of an even number of images, at most `most`
    (0: the whole micro-batch); 96 -> 32, 48 -> 24. Runs never span devices (whose rows are
    even), so the mixing needs no communication."""
    rows = batch // devices if batch % devices == 0 and batch // devices % 2 == 0 else batch
    if most <= 0 or rows % 2:  # the whole micro-batch (an odd one: mixup_cutmix refuses it)
        return batch
    count = -(-rows // max(most, 2))
    while rows % count or rows // count % 2:
        count += 1  # ends by rows / 2 runs of 2 images
    return rows // count


def _check_finetune(config, problems: list[str]) -> None:
    if not 0 < config.layer_decay <= 1:
        problems.append(f"layer_decay {config.layer_decay} must be in (0, 1]")
    if not 0 <= config.label_smoothing < 1:
        problems.append(f"label_smoothing {config.label_smoothing} must be in [0, 1)")
    if config.mixup < 0 or config.cutmix < 0:
        problems.append(f"mixup {config.mixup} and cutmix {config.cutmix} must be >= 0")
    micro_batch = config.batch_size // max(config.grad_accum_steps, 1)
    if config.mixup_batch < 0 or config.mixup_batch == 1:
        problems.append(f"mixup_batch {config.mixup_batch} must be 0 (the micro-batch) or >= 2")
    if (config.mixup > 0 or config.cutmix > 0) and micro_batch % 2:
        problems.append(
            f"mixup / cutmix pair each image with the batch reversed: the micro-batch "
            f"{micro_batch} must be even"
        )
    if not 0 <= config.reprob <= 1:
        problems.append(f"reprob {config.reprob} must be in [0, 1]")
    if config.remode not in ("pixel", "rand", "const"):
        problems.append(f"remode {config.remode!r} must be pixel, rand or const")
    if config.recount < 1:
        problems.append(f"recount {config.recount} must be >= 1")
    if not 0 <= config.model.drop_path_rate < 1:
        problems.append(f"model.drop_path_rate {config.model.drop_path_rate} must be in [0, 1)")
