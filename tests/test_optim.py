"""Schedules, weight-decay masks, layer decay and AdamW against the official / torch formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from mae_jax.core import optim


def mae_adjust_learning_rate(step, *, peak, warmup, total, min_lr):
    """The official MAE util/lr_sched.py formula, written out in Python floats."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mmcv_poly_with_linear_warmup(step, *, base, warmup, total, power, min_lr, ratio):
    """mmcv PolyLrUpdaterHook.get_lr + LrUpdaterHook.get_warmup_lr('linear'), by iteration."""
    regular = (base - min_lr) * (1 - step / total) ** power + min_lr
    if step < warmup:
        k = (1 - step / warmup) * (1 - ratio)
        return regular * (1 - k)
    return regular


def test_scale_learning_rate_uses_effective_batch_over_256():
    assert optim.scale_learning_rate(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert optim.scale_learning_rate(1e-3, 128, reference_batch=256) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="global_batch"):
        optim.scale_learning_rate(1e-3, 0)


def test_warmup_cosine_matches_official_mae_schedule():
    kw = dict(peak=2.4e-3, warmup=40, total=800, min_lr=1e-6)
    schedule = optim.warmup_cosine_schedule(
        peak_lr=kw["peak"], warmup_steps=kw["warmup"], total_steps=kw["total"], min_lr=kw["min_lr"]
    )
    for step in [0, 1, 20, 39, 40, 41, 420, 799, 800]:
        np.testing.assert_allclose(float(schedule(step)), mae_adjust_learning_rate(step, **kw),
                                   rtol=1e-5, atol=1e-12)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(420)), (2.4e-3 + 1e-6) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(10_000)), 1e-6, rtol=1e-5)


def test_warmup_poly_matches_mmcv_poly_with_linear_warmup():
    kw = dict(base=1e-4, warmup=1500, total=160_000, power=1.0, min_lr=0.0, ratio=1e-6)
    schedule = optim.warmup_poly_schedule(peak_lr=1e-4, warmup_steps=1500, total_steps=160_000)
    for step in [0, 1, 750, 1499, 1500, 80_000, 159_999, 160_000]:
        np.testing.assert_allclose(float(schedule(step)), mmcv_poly_with_linear_warmup(step, **kw),
                                   rtol=1e-5, atol=1e-14)
    kw2 = dict(base=1e-3, warmup=10, total=100, power=0.9, min_lr=1e-5, ratio=0.1)
    schedule2 = optim.warmup_poly_schedule(
        peak_lr=1e-3, warmup_steps=10, total_steps=100, power=0.9, min_lr=1e-5, warmup_ratio=0.1
    )
    for step in [0, 5, 10, 50, 99]:
        np.testing.assert_allclose(float(schedule2(step)),
                                   mmcv_poly_with_linear_warmup(step, **kw2), rtol=1e-5)


class TinyViTLike(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.cls_token = nnx.Param(jnp.zeros((1, 1, 8)))
        self.fc = nnx.Linear(8, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)


def test_weight_decay_mask_follows_timm_rule_on_nnx_params():
    _, params, _ = nnx.split(TinyViTLike(rngs=nnx.Rngs(0)), nnx.Param, ...)
    mask = optim.weight_decay_mask(params).to_pure_dict()
    assert mask["fc"]["kernel"] is True
    assert mask["fc"]["bias"] is False
    assert mask["norm"]["scale"] is False and mask["norm"]["bias"] is False
    assert mask["cls_token"] is True  # timm decays every ndim > 1 param, cls_token included.
    extra = optim.weight_decay_mask(params, no_decay_names=("pos_embed", "cls_token"))
    assert extra.to_pure_dict()["cls_token"] is False
    regex = optim.weight_decay_mask({"a": {"relative_position_bias_table": jnp.ones((5, 2))}},
                                    no_decay_names=[r".*position_bias_table"])
    assert regex["a"]["relative_position_bias_table"] is False


def fake_vit_params(prefix="encoder", depth=2):
    block = {"attn": {"qkv": {"kernel": jnp.ones((4, 12)), "bias": jnp.ones((12,))}}}
    return {
        prefix: {
            "cls_token": jnp.ones((1, 1, 4)),
            "pos_embed": jnp.ones((1, 5, 4)),
            "patch_embed": {"kernel": jnp.ones((2, 2, 3, 4)), "bias": jnp.ones((4,))},
            "blocks": {i: block for i in range(depth)},
            "norm": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
        },
        "head": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
    }


def test_vit_layer_ids_for_depth_two():
    depth = 2
    assert optim.vit_layer_id(("encoder", "cls_token"), depth=depth) == 0
    assert optim.vit_layer_id(("encoder", "pos_embed"), depth=depth) == 0
    assert optim.vit_layer_id(("encoder", "patch_embed", "kernel"), depth=depth) == 0
    assert optim.vit_layer_id(("encoder", "blocks", 0, "attn", "qkv", "kernel"), depth=depth) == 1
    assert optim.vit_layer_id(("encoder", "blocks", "1", "mlp", "bias"), depth=depth) == 2
    assert optim.vit_layer_id(("encoder", "norm", "scale"), depth=depth) == 3
    assert optim.vit_layer_id(("head", "kernel"), depth=depth) == 3
    backbone_path = ("backbone", "blocks", 1, "x")
    assert optim.vit_layer_id(backbone_path, depth=depth, prefix=("backbone",)) == 2
    with pytest.raises(ValueError, match="out of range"):
        optim.vit_layer_id(("encoder", "blocks", 2, "x"), depth=depth)


@pytest.mark.parametrize("convention", ["mae", "mmseg"])
def test_layer_decay_scales_in_both_conventions(convention):
    prefix = "encoder" if convention == "mae" else "backbone"
    params = fake_vit_params(prefix)
    scales = optim.layer_decay_scales(params, decay=0.5, depth=2, prefix=(prefix,),
                                      convention=convention)
    enc = scales[prefix]
    # mae: num_layers = 3, scale = 0.5**(3 - id); mmseg: num_layers = 4, 0.5**(4 - id - 1).
    assert enc["cls_token"] == enc["pos_embed"] == enc["patch_embed"]["kernel"] == 0.5**3
    assert enc["blocks"][0]["attn"]["qkv"]["kernel"] == 0.5**2
    assert enc["blocks"][1]["attn"]["qkv"]["bias"] == 0.5
    assert enc["norm"]["scale"] == 1.0 and scales["head"]["kernel"] == 1.0


def test_vit_b_mmseg_layer_decay_has_fourteen_groups():
    params = fake_vit_params("backbone", depth=12)
    scales = optim.layer_decay_scales(params, decay=0.65, depth=12, prefix=("backbone",),
                                      convention="mmseg")
    values = sorted(set(jax.tree_util.tree_leaves(scales)))
    np.testing.assert_allclose(values, sorted(0.65 ** (14 - i - 1) for i in range(14)))


def torch_adamw_reference(params, grads_per_step, *, lrs, wd_mask, lr_scales, wd, betas, clip):
    """torch.optim.AdamW with one param group per leaf (lr * scale, wd or 0)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    tensors = [torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in leaves]
    groups = [
        {"params": [t], "lr": lrs[0] * s, "weight_decay": wd if m else 0.0, "lr_scale": s}
        for t, m, s in zip(tensors, jax.tree_util.tree_leaves(wd_mask),
                           jax.tree_util.tree_leaves(lr_scales), strict=True)
    ]
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=betas, eps=1e-8)
    for step, grads in enumerate(grads_per_step):
        for group in opt.param_groups:  # Per-step lr with per-group scale, as MAE's lr_sched.
            group["lr"] = lrs[step] * group["lr_scale"]
        for t, g in zip(tensors, jax.tree_util.tree_leaves(grads), strict=True):
            t.grad = torch.tensor(np.asarray(g), dtype=torch.float64)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(tensors, clip)
        opt.step()
    return jax.tree_util.tree_unflatten(treedef, [t.detach().numpy() for t in tensors])


@pytest.mark.parametrize("clip", [None, 0.5])
def test_adamw_with_layer_decay_matches_torch(clip):
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), fake_vit_params()
    )
    grads_per_step = [
        jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        for _ in range(3)
    ]
    schedule = optim.warmup_cosine_schedule(peak_lr=1e-2, warmup_steps=1, total_steps=4)
    # The official fine-tuning recipe's exclusions (timm `no_weight_decay()`).
    mask = optim.weight_decay_mask(params, no_decay_names=("pos_embed", "cls_token"))
    scales = optim.layer_decay_scales(params, decay=0.5, depth=2)
    tx = optim.create_optimizer(learning_rate=schedule, b1=0.9, b2=0.95, weight_decay=0.05,
                                weight_decay_mask=mask, layer_decay_scales=scales,
                                clip_grad_norm=clip)
    state = tx.init(params)
    new_params = params
    lrs = []

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for index, grads in enumerate(grads_per_step):
        lrs.append(float(schedule(index)))
        new_params, state = step(new_params, state, grads)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-2)
    expected = torch_adamw_reference(params, grads_per_step, lrs=lrs, wd_mask=mask,
                                     lr_scales=scales, wd=0.05, betas=(0.9, 0.95), clip=clip)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           new_params, expected)


def test_create_optimizer_accepts_nnx_state():
    _, params, _ = nnx.split(TinyViTLike(rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = optim.create_optimizer(learning_rate=1e-3, weight_decay=0.05,
                                weight_decay_mask=optim.weight_decay_mask(params),
                                layer_decay_scales=optim.layer_decay_scales(params, decay=0.5,
                                                                            depth=1, prefix=()))
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates).to_pure_dict()
    # fc is "everything else" (scale 1): Adam's first step is -lr * sign(g) plus decay.
    expected = params.to_pure_dict()["fc"]["kernel"] * (1 - 1e-3 * 0.05) - 1e-3
    np.testing.assert_allclose(new["fc"]["kernel"], expected, rtol=1e-5, atol=1e-7)
