"""Fine-tuning (`main_finetune.py`): `train_and_evaluate(config, workdir)` behind finetune.py.

Global average pooling + fc_norm, head N(0, 2e-5), drop path; AdamW (0.9, 0.999), wd 0.05 off
biases, 1-D parameters, pos_embed and cls_token (timm's `no_weight_decay`), layer-wise lr decay
(`param_groups_lrd`); RandAugment in the input pipeline; random erasing, Mixup / CutMix and
label smoothing in the step (batches arrive as uint8 and are normalised there).
"""

from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

from mae_jax.classification import lib
from mae_jax.classification.config import mixup_group
from mae_jax.classification.erasing import random_erasing
from mae_jax.classification.mixup import (
    label_smoothing_cross_entropy,
    mixup_cutmix,
    soft_target_cross_entropy,
)
from mae_jax.core import config as core_config
from mae_jax.core import optim
from mae_jax.models.layers import make_rngs

# timm VisionTransformer.no_weight_decay(), which main_finetune.py passes to param_groups_lrd.
NO_WEIGHT_DECAY = ("pos_embed", "cls_token")


def create_tx(config, params, schedule) -> optax.GradientTransformation:
    """AdamW with the official parameter groups: per-layer lr scales and decay exclusions."""
    depth = core_config.encoder_dims(config.model)["depth"]
    return optim.create_optimizer(
        learning_rate=schedule,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        weight_decay_mask=optim.weight_decay_mask(params, no_decay_names=NO_WEIGHT_DECAY),
        layer_decay_scales=optim.layer_decay_scales(
            params, decay=config.layer_decay, depth=depth, prefix=("encoder",), convention="mae"
        ),
        clip_grad_norm=config.clip_grad_norm or None,
    )


def make_loss_fn(config, num_classes: int, batch_devices: int = 1):
    """loss_fn(model, batch, rng): erasing -> Mixup / CutMix -> model with drop path -> loss.

    Mixup / CutMix draw for each run of `mixup_group` images of each device's rows (of the
    `batch_devices` a micro-batch is split over), as the official code does per GPU batch.

    The criterion follows main_finetune.py: SoftTargetCrossEntropy with mixing (smoothing is
    in the targets), LabelSmoothingCrossEntropy without, plain cross-entropy at 0 smoothing.
    """
    from mae_jax.data.constants import normalize_uint8

    mixing = config.mixup > 0 or config.cutmix > 0

    def loss_fn(model, batch, rng):
        erase_key, mix_key, drop_key = jax.random.split(rng, 3)
        images = normalize_uint8(batch["image"])
        if config.reprob > 0:
            images = random_erasing(images, erase_key, probability=config.reprob,
                                    mode=config.remode, max_count=config.recount)
        if mixing:
            images, targets = mixup_cutmix(
                images, batch["label"], mix_key, num_classes=num_classes,
                mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                switch_prob=config.mixup_switch_prob, prob=config.mixup_prob,
                label_smoothing=config.label_smoothing,
                group=mixup_group(images.shape[0], config.mixup_batch, batch_devices),
            )
        logits = model(images, train=True, rngs=make_rngs(dropout=drop_key))
        if mixing:
            loss = soft_target_cross_entropy(logits, targets)
        else:
            loss = label_smoothing_cross_entropy(logits, batch["label"], config.label_smoothing)
        return loss, {}

    return loss_fn


RECIPE = lib.Recipe(task="finetune", global_pool=True, trainable=nnx.Param,
                    create_tx=create_tx, make_loss_fn=make_loss_fn)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None):
    """Fine-tunes (or resumes, or with eval_only evaluates) in `workdir`; returns the last
    evaluation (top1, top5, loss, num_examples, step, split, export paths)."""
    return lib.train_and_evaluate(config, workdir, RECIPE, devices=devices)
