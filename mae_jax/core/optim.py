"""Optimisers and learning-rate schedules: MAE pretraining and UPerNet fine-tuning recipes.

Everything here works on generic parameter pytrees (dicts, or the `nnx.State` that
`nnx.split(model, nnx.Param, ...)` returns) and decides per parameter from its *path*, e.g.
('encoder', 'blocks', 3, 'attn', 'qkv', 'kernel'), so the rules live in one place.

Recipes (official MAE `main_pretrain.py`, mmseg's MAE config):
  pretraining:  AdamW(0.9, 0.95), wd 0.05 except 1-D params and biases, lr scaled by batch/256,
                linear warmup then half-cycle cosine, per step (`warmup_cosine_schedule`).
  segmentation: AdamW(0.9, 0.999), wd 0.05, mmseg layer decay 0.65 (`layer_decay_scales(...,
                convention="mmseg")`), linear warmup 1500 iters then poly (`warmup_poly_schedule`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Schedule = Callable[[jax.Array | int], jax.Array]

def path_to_names(path: Sequence[Any]) -> tuple[str | int, ...]:
    """Turns a jax key path (or a plain tuple of keys) into plain names.

    ('encoder', 'blocks', 3, 'attn', 'qkv', 'kernel') comes out the same whether it came from a
    nested dict, an `nnx.State` (which adds a trailing `.value` attribute key) or a list.
    """
    names: list[str | int] = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            key = key.key
        elif isinstance(key, jax.tree_util.GetAttrKey):
            key = key.name
        elif isinstance(key, jax.tree_util.SequenceKey):
            key = key.idx
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            key = key.key
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        names.append(key)
    # nnx Variables are pytree nodes whose single child is their value.
    while names and names[-1] in ("value", "raw_value"):
        names.pop()
    return tuple(names)


# ----------------------------------------------------------------------------- schedules


def scale_learning_rate(base_lr: float, global_batch: int, *, reference_batch: int = 256) -> float:
    """Official MAE linear scaling rule: lr = base_lr * effective_batch / 256.

    `global_batch` is the effective batch: per-device batch * devices * grad accumulation steps.
    """
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(
            f"global_batch ({global_batch}) and reference_batch ({reference_batch}) must be > 0."
        )
    return base_lr * global_batch / reference_batch


def warmup_cosine_schedule(
    *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> Schedule:
    """Official MAE `adjust_learning_rate`, evaluated per optimizer step.

    step < warmup: peak * step / warmup; then min + (peak - min) * 0.5 * (1 + cos(pi * t)),
    t = (step - warmup) / (total - warmup). Steps past `total_steps` stay at `min_lr`.
    """
    if total_steps <= warmup_steps or warmup_steps < 0:
        raise ValueError(
            f"Need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}."
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        # 0.5 * (1 + cos(pi t)) == cos(pi t / 2)**2; the latter keeps float32 precision near t=1.
        cosine = min_lr + (peak_lr - min_lr) * jnp.cos(0.5 * math.pi * progress) ** 2
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


def warmup_poly_schedule(
    *,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_ratio: float = 1e-6,
) -> Schedule:
    """mmcv `PolyLrUpdaterHook` (by_epoch=False) with warmup='linear', per iteration.

    regular = (peak - min) * (1 - i / total)**power + min;
    i < warmup: regular * (1 - (1 - i / warmup) * (1 - warmup_ratio)).
    """
    if total_steps <= 0 or warmup_steps < 0 or not 0 < warmup_ratio <= 1:
        raise ValueError(
            f"Need total_steps > 0, warmup_steps >= 0 and 0 < warmup_ratio <= 1; got "
            f"{total_steps}, {warmup_steps}, {warmup_ratio}."
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        # Algebraically mmcv's formulas, arranged to avoid float32 cancellation:
        # 1 - i/T == (T - i)/T and 1 - (1 - a)(1 - r) == r + a(1 - r).
        coeff = jnp.clip((total_steps - step) / total_steps, 0.0, 1.0) ** power
        regular = (peak_lr - min_lr) * coeff + min_lr
        warmup_factor = warmup_ratio + step / max(warmup_steps, 1) * (1.0 - warmup_ratio)
        return jnp.where(step < warmup_steps, regular * warmup_factor, regular)

    return schedule


# ------------------------------------------------------------------ per-parameter rules


def _name_matches(names: tuple[str | int, ...], patterns: Iterable[str]) -> bool:
    """A pattern matches when it equals a path component, or as a regex on the dotted name."""
    dotted = ".".join(str(n) for n in names)
    for pattern in patterns:
        if pattern in names or re.fullmatch(pattern, dotted):
            return True
    return False


def weight_decay_mask(params: PyTree, *, no_decay_names: Iterable[str] = ()) -> PyTree:
    """Pytree of bools, True where weight decay applies.

    timm `param_groups_weight_decay` (official MAE pretraining): decay every param with
    ndim > 1 except names ending in 'bias'; so cls_token/mask_token (ndim 3) ARE decayed.
    `no_decay_names` adds exclusions: a path component ('pos_embed') or a regex on the dotted
    name ('.*relative_position_bias_table').
    """
    no_decay_names = tuple(no_decay_names)

    def decide(path, leaf):
        names = path_to_names(path)
        if jnp.ndim(leaf) <= 1 or (names and names[-1] == "bias"):
            return False
        return not _name_matches(names, no_decay_names)

    return jax.tree_util.tree_map_with_path(decide, params)


def vit_layer_id(
    path: Sequence[Any],
    *,
    depth: int,
    prefix: Sequence[str] = ("encoder",),
) -> int:
    """Layer id of one parameter for layer-wise lr decay.

    cls_token / pos_embed / mask_token / patch_embed -> 0, blocks.i -> i + 1, and everything
    else (final norm, fc_norm, heads, neck, decoder) -> depth + 1. That is num_layers in the
    official MAE fine-tune (num_layers = depth + 1) and num_layers - 1 in mmseg (num_layers =
    depth + 2): the ids agree. `prefix` is where the ViT backbone lives in the tree, e.g.
    ('backbone',); () for the root. Block lists may be named 'blocks' (MAE) or 'layers' (mmseg).
    """
    names = path_to_names(path)
    prefix = tuple(prefix)
    last = depth + 1
    if names[: len(prefix)] != prefix or len(names) == len(prefix):
        return last
    name = names[len(prefix)]
    if name in ("cls_token", "pos_embed", "mask_token", "dist_token", "patch_embed"):
        return 0
    if name in ("blocks", "layers") and len(names) > len(prefix) + 1:
        block = int(names[len(prefix) + 1])
        if not 0 <= block < depth:
            raise ValueError(f"Block index {block} in {names} is out of range for depth {depth}.")
        return block + 1
    return last


def layer_decay_scales(
    params: PyTree,
    *,
    decay: float,
    depth: int,
    prefix: Sequence[str] = ("encoder",),
    convention: Literal["mae", "mmseg"] = "mae",
) -> PyTree:
    """Pytree of per-parameter lr multipliers for layer-wise lr decay.

    "mae" (official MAE fine-tune `param_groups_lrd`): scale = decay**(depth + 1 - layer_id),
    so heads and the final norm get 1.0 and patch_embed gets decay**(depth + 1).
    "mmseg" (LayerDecayOptimizerConstructor, num_layers = depth + 2):
    scale = decay**(num_layers - layer_id - 1) = decay**(depth + 1 - layer_id): the same numbers.
    Both conventions give neck/heads 1.0 and ViT-B patch_embed 0.65**13.
    """
    if convention == "mae":
        num_layers, offset = depth + 1, 0
    elif convention == "mmseg":
        num_layers, offset = depth + 2, 1
    else:
        raise ValueError(f"Unknown layer decay convention {convention!r}; use 'mae' or 'mmseg'.")

    def scale(path, _):
        layer_id = vit_layer_id(path, depth=depth, prefix=prefix)
        return decay ** (num_layers - layer_id - offset)

    return jax.tree_util.tree_map_with_path(scale, params)


# ------------------------------------------------------------------------- optimizer


def scale_by_tree(scales: PyTree) -> optax.GradientTransformation:
    """Multiplies each update leaf by the matching float in `scales` (a per-param lr factor)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(
    *,
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: float = 0.0,
    weight_decay_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    layer_decay_scales: PyTree | None = None,
    clip_grad_norm: float | None = None,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW exactly as torch.optim.AdamW with per-group lr, plus clipping and accumulation.

    update = -lr(step) * scale * (adam_step + wd * mask * param), i.e. the decay is decoupled
    but multiplied by the (scaled) lr, as torch does; `layer_decay_scales` plays torch's
    per-group lr and so scales both terms. Clipping (global norm) applies to the gradient
    before Adam. (Gradient accumulation happens inside the train step, `mae_jax.core.step`.)
    `weight_decay_mask` and `layer_decay_scales` must have the structure of the params passed
    to `init`/`update` (build them from that same tree, nnx.State or plain dict).
    """
    parts = []
    if clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_grad_norm))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if layer_decay_scales is not None:
        parts.append(scale_by_tree(layer_decay_scales))
    return optax.chain(*parts)
