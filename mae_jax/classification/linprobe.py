"""Linear probing (`main_linprobe.py`): `train_and_evaluate(config, workdir)` behind linprobe.py.

The encoder is frozen (it lives in the state's `rest`, so the step never differentiates it);
the cls token after the final norm feeds BatchNorm(affine=False, eps 1e-6) and a Linear head
(N(0, 0.01)), trained with LARS (momentum 0.9, trust 0.001, weight decay 0) at base lr 0.1 x
batch / 256, warmup + cosine, cross-entropy; RandomResizedCrop + flip for training, its boxes
drawn as MAE's util/crop.py draws them (`data.crop_style`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mae_jax.classification import lib
from mae_jax.classification.lars import lars


def is_head(path: tuple, _value: Any = None) -> bool:
    """The probe's trainable parameters: those of `head` (the Linear; BatchNorm has none)."""
    return len(path) > 0 and path[0] == "head"


TRAINABLE = nnx.All(nnx.Param, is_head)


def create_tx(config, params, schedule) -> optax.GradientTransformation:
    del params  # LARS decides per parameter from its rank
    return lars(schedule, momentum=config.momentum, trust_coefficient=config.trust_coefficient,
                weight_decay=config.weight_decay)


def make_loss_fn(config, num_classes: int, batch_devices: int = 1):
    """loss_fn(model, batch, rng): cross-entropy of the probe; BatchNorm in training mode."""
    from mae_jax.data.constants import normalize_uint8

    del config, num_classes, batch_devices

    def loss_fn(model, batch, rng):
        del rng  # nothing random in the probe's forward
        logits = model(normalize_uint8(batch["image"]), train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).astype(jnp.float32).mean()
        return loss, {"train_top1": 100.0 * accuracy}

    return loss_fn


RECIPE = lib.Recipe(task="linprobe", global_pool=False, trainable=TRAINABLE,
                    create_tx=create_tx, make_loss_fn=make_loss_fn)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None):
    """Probes (or resumes, or with eval_only evaluates) in `workdir`; returns the last
    evaluation (top1, top5, loss, num_examples, step, split)."""
    return lib.train_and_evaluate(config, workdir, RECIPE, devices=devices)
