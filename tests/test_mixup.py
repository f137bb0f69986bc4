"""Mixup / CutMix / losses (mae_jax.classification.mixup) against timm 0.3.2's formulas.

The timm pieces (mixup_target's smoothing, rand_bbox, cutmix_bbox_and_lam, _params_per_batch,
SoftTargetCrossEntropy, LabelSmoothingCrossEntropy) are written out in numpy below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from mae_jax.classification import mixup as mx

K = 7  # classes
# Every jitted function is compiled once (Beta sampling is slow to compile); switch_prob / prob
# / lam are traced so that one compilation serves all values.
mixup_cutmix = jax.jit(mx.mixup_cutmix, static_argnames=("num_classes",))
mix_batch = jax.jit(mx.mix_batch, static_argnames=("num_classes", "label_smoothing"))
rand_bbox = jax.jit(mx.rand_bbox, static_argnames=("height", "width"))
sample_many = jax.jit(
    jax.vmap(
        lambda k, switch, prob: mx.sample_mix_params(k, switch_prob=switch, prob=prob),
        in_axes=(0, None, None),
    )
)
bbox_many = jax.jit(jax.vmap(mx.rand_bbox, in_axes=(0, None, None, None)), static_argnums=(2, 3))


soft_ce = jax.jit(mx.soft_target_cross_entropy)
smoothing_ce = jax.jit(mx.label_smoothing_cross_entropy)
N_DRAWS = 4000  # every sample_many call uses this many keys (one compilation)


def timm_smooth_one_hot(labels, num_classes, smoothing):
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = np.full((len(labels), num_classes), off)
    out[np.arange(len(labels)), labels] = on
    return out


def timm_mixup_target(labels, num_classes, lam, smoothing):
    y1 = timm_smooth_one_hot(labels, num_classes, smoothing)
    y2 = timm_smooth_one_hot(labels[::-1], num_classes, smoothing)
    return y1 * lam + y2 * (1.0 - lam)


def timm_rand_bbox_from_centre(height, width, lam, cy, cx):
    """timm rand_bbox with the centre given (cy ~ randint(0, H), cx ~ randint(0, W))."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    yl = np.clip(cy - cut_h // 2, 0, height)
    yh = np.clip(cy + cut_h // 2, 0, height)
    xl = np.clip(cx - cut_w // 2, 0, width)
    xh = np.clip(cx + cut_w // 2, 0, width)
    return yl, yh, xl, xh


def _batch(b=6, h=12, w=10, c=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(b, h, w, c)).astype(np.float32)
    labels = rng.integers(0, K, size=b)
    return jnp.asarray(images), jnp.asarray(labels)


def test_mixup_blends_with_the_flipped_batch_and_targets_are_lam_weighted_smoothed_one_hots():
    images, labels = _batch()
    x = np.asarray(images)
    for lam in (0.0, 0.3, 0.77):
        out, targets = mix_batch(images, labels, lam, False, jax.random.key(0), num_classes=K)
        np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], atol=1e-6)
        expected = timm_mixup_target(np.asarray(labels), K, lam, 0.1)
        np.testing.assert_allclose(targets, expected, atol=1e-6)
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, atol=1e-6)


def test_smoothing_puts_smoothing_over_classes_off_and_one_minus_smoothing_plus_that_on():
    got = mx.smooth_one_hot(jnp.array([2, 0]), 5, 0.1)
    np.testing.assert_allclose(got, timm_smooth_one_hot(np.array([2, 0]), 5, 0.1), atol=1e-7)
    np.testing.assert_allclose(got[0], [0.02, 0.02, 0.92, 0.02, 0.02], atol=1e-7)


def test_cutmix_pastes_the_flipped_batch_in_one_box_and_lam_is_corrected_to_the_box_area():
    b, h, w = 4, 16, 20
    # Image i is the constant i + 1, so pasted pixels are recognisable.
    images = jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None], (b, h, w, 3))
    labels = jnp.array([0, 1, 2, 3])
    rng = np.random.default_rng(0)
    for seed in range(10):
        raw_lam = float(rng.uniform(0.05, 0.95))
        box_key = jax.random.key(seed)
        out, targets = mix_batch(
            images, labels, raw_lam, True, box_key, num_classes=4, label_smoothing=0.0
        )
        yl, yh, xl, xh = (int(v) for v in rand_bbox(box_key, raw_lam, height=h, width=w))
        assert yh > yl and xh > xl
        expected = np.zeros((h, w), bool)
        expected[yl:yh, xl:xh] = True
        for i in range(b):  # image i receives image b - 1 - i (value b - i) inside the box
            np.testing.assert_array_equal(np.asarray(out[i, :, :, 0]) == b - i, expected)
            np.testing.assert_array_equal(np.asarray(out[i, :, :, 0])[~expected], i + 1)
        # With smoothing 0, target[0] = lam on class 0 and 1 - lam on class 3.
        lam = 1.0 - expected.sum() / (h * w)
        np.testing.assert_allclose(targets[0, 0], lam, atol=1e-6)
        np.testing.assert_allclose(targets[0, 3], 1.0 - lam, atol=1e-6)


def test_cutmix_box_distribution_matches_timm_rand_bbox_enumerated_over_all_centres():
    h, w, n = 24, 18, 6000
    for lam in (0.3, 0.85):
        keys = jax.random.split(jax.random.key(11), n)
        yl, yh, xl, xh = bbox_many(keys, lam, h, w)
        # timm: cy uniform on range(h), cx uniform on range(w): exact box distributions.
        ref_y = [timm_rand_bbox_from_centre(h, w, lam, cy, 0)[:2] for cy in range(h)]
        ref_x = [timm_rand_bbox_from_centre(h, w, lam, 0, cx)[2:] for cx in range(w)]
        for got, ref in ((np.stack([yl, yh], 1), ref_y), (np.stack([xl, xh], 1), ref_x)):
            ref = np.array(ref)
            support = {tuple(r) for r in ref}
            assert {tuple(g) for g in got} <= support  # every box is one timm can draw
            for pair in support:  # frequencies: 4000+ draws, tolerance ~5 standard errors
                p = np.mean(np.all(ref == pair, axis=1))
                f = np.mean(np.all(got == pair, axis=1))
                assert abs(f - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-3, (lam, pair, f, p)


def test_switch_prob_picks_cutmix_half_the_time_and_lam_follows_each_methods_beta():
    n = N_DRAWS
    keys = jax.random.split(jax.random.key(5), n)
    lam, use_cutmix = sample_many(keys, 0.5, 1.0)
    lam, use_cutmix = np.asarray(lam, np.float64), np.asarray(use_cutmix)
    assert abs(use_cutmix.mean() - 0.5) < 0.04  # binomial sd 0.008
    # cutmix_alpha = 1 -> Beta(1, 1) = U(0, 1); mixup_alpha = 0.8 -> Beta(0.8, 0.8).
    assert stats.kstest(lam[use_cutmix], stats.beta(1.0, 1.0).cdf).pvalue > 1e-3
    assert stats.kstest(lam[~use_cutmix], stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    assert stats.kstest(lam[~use_cutmix], stats.beta(1.0, 1.0).cdf).pvalue < 1e-3


def test_prob_leaves_the_rest_of_the_batches_unmixed_with_smoothed_one_hot_targets():
    keys = jax.random.split(jax.random.key(9), N_DRAWS)
    lam, use_cutmix = sample_many(keys, 0.5, 0.3)
    unmixed = np.asarray(lam) == 1.0
    assert abs(unmixed.mean() - 0.7) < 0.04
    assert not np.asarray(use_cutmix)[unmixed].any()

    images, labels = _batch()  # lam = 1: timm returns the batch as is, targets just smoothed
    out, targets = mix_batch(images, labels, 1.0, False, jax.random.key(0), num_classes=K)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, timm_smooth_one_hot(np.asarray(labels), K, 0.1), atol=1e-7)


def test_jitted_mixup_cutmix_follows_timm_batch_mode_for_either_method():
    """Under jit (static shapes), against timm's _mix_batch + mixup_target replayed in numpy
    with the same lam / method / box draws."""
    images, labels = _batch(b=8)
    x, y = np.asarray(images), np.asarray(labels)
    keys = jax.random.split(jax.random.key(21), N_DRAWS)
    params = jax.vmap(jax.random.split)(keys)  # k_params, k_box of each key
    all_lam, all_cutmix = sample_many(params[:, 0], 0.5, 1.0)
    methods = set()
    for i in range(8):
        out, targets = mixup_cutmix(images, labels, keys[i], num_classes=K, prob=1.0)
        assert out.shape == images.shape and targets.shape == (8, K)
        k_box = params[i, 1]
        lam, use_cutmix = float(all_lam[i]), bool(all_cutmix[i])
        methods.add(use_cutmix)
        if use_cutmix:
            yl, yh, xl, xh = (int(v) for v in rand_bbox(k_box, lam, height=12, width=10))
            expected = x.copy()
            expected[:, yl:yh, xl:xh] = x[::-1][:, yl:yh, xl:xh]
            lam = 1.0 - (yh - yl) * (xh - xl) / (12 * 10)
        else:
            expected = x * lam + x[::-1] * (1.0 - lam)
        np.testing.assert_allclose(out, expected, atol=1e-6)
        np.testing.assert_allclose(targets, timm_mixup_target(y, K, lam, 0.1), atol=1e-6)
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, atol=1e-6)
    assert methods == {True, False}
    out, targets = mixup_cutmix(images, labels, keys[0], num_classes=K, prob=0.0)  # never mixes
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, timm_smooth_one_hot(y, K, 0.1), atol=1e-7)


def test_groups_mix_like_the_official_per_gpu_batches():
    """group=G (config.mixup_batch, the official per-GPU batch 32): each run of G images is a
    batch of its own, as each GPU's DataLoader batch is in main_finetune.py: its own lam, and
    its images paired with that run reversed (a recipe audit: one lam for all 1024 images)."""
    b, g = 12, 4
    images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, 2, 2, 1))
    labels = jnp.arange(b)
    grouped = jax.jit(mx.mixup_cutmix, static_argnames=("num_classes", "mixup_alpha",
                                                       "cutmix_alpha", "group"))
    out, targets = grouped(images, labels, jax.random.key(4), num_classes=b, cutmix_alpha=0.0,
                           label_smoothing=0.0, group=g)
    out, targets = np.asarray(out)[:, 0, 0, 0], np.asarray(targets)
    partner = np.arange(b).reshape(-1, g)[:, ::-1].reshape(-1)  # i paired within its run
    lam = targets[np.arange(b), np.arange(b)]
    np.testing.assert_allclose(targets[np.arange(b), partner], 1 - lam, atol=1e-6)
    np.testing.assert_allclose(out, lam * np.arange(b) + (1 - lam) * partner, atol=1e-5)
    per_group = lam.reshape(-1, g)
    np.testing.assert_allclose(per_group, per_group[:, :1].repeat(g, 1), atol=1e-6)
    assert len(np.unique(per_group[:, 0].round(6))) == b // g  # a lam for each run
    whole, _ = grouped(images, labels, jax.random.key(4), num_classes=b, cutmix_alpha=0.0,
                       label_smoothing=0.0, group=0)  # one batch: paired with all reversed
    lam0 = float((np.asarray(whole)[0, 0, 0, 0] - (b - 1)) / (0 - (b - 1)))
    np.testing.assert_allclose(np.asarray(whole)[:, 0, 0, 0],
                               lam0 * np.arange(b) + (1 - lam0) * np.arange(b)[::-1], atol=1e-5)
    # CutMix in each run: a box of the run's partner image, lam its share of the pixels.
    cut, cut_targets = grouped(images[:, :1, :1].repeat(8, 1).repeat(8, 2), labels,
                               jax.random.key(5), num_classes=b, cutmix_alpha=1.0,
                               mixup_alpha=0.0, label_smoothing=0.0, group=g)
    cut, cut_targets = np.asarray(cut)[..., 0].reshape(b, -1), np.asarray(cut_targets)
    kept = (cut == np.arange(b)[:, None]).mean(1)
    assert ((cut == np.arange(b)[:, None]) | (cut == partner[:, None])).all()
    np.testing.assert_allclose(cut_targets[np.arange(b), np.arange(b)], kept, atol=1e-6)
    assert (kept.reshape(-1, g) == kept.reshape(-1, g)[:, :1]).all()  # one box a run
    for group in (5, 7):  # runs must be even and divide the batch
        with pytest.raises(ValueError, match=f"groups of {group} images must be even and div"):
            mx.mixup_cutmix(images, labels, jax.random.key(0), num_classes=b, group=group)


def test_fine_tuning_mixes_each_devices_rows_in_runs_of_mixup_batch(monkeypatch):
    """The wiring: finetune.make_loss_fn hands `mixup_group` of its batch, its devices and
    config.mixup_batch to mixup_cutmix."""
    import ml_collections

    from mae_jax.classification import finetune

    seen = []

    def mixing(images, labels, key, **options):
        seen.append(options["group"])
        raise StopIteration

    monkeypatch.setattr(finetune, "mixup_cutmix", mixing)
    config = ml_collections.ConfigDict(dict(mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5,
                                            mixup_prob=1.0, label_smoothing=0.1, reprob=0.0,
                                            mixup_batch=32))
    batch = {"image": jnp.zeros((96, 4, 4, 3), jnp.uint8), "label": jnp.zeros(96, jnp.int32)}
    for devices, group in ((1, 32), (4, 24)):
        with pytest.raises(StopIteration):
            finetune.make_loss_fn(config, K, devices)(None, batch, jax.random.key(0))
        assert seen.pop() == group


def test_odd_batches_and_integer_images_are_rejected():
    images, labels = _batch(b=5)
    with pytest.raises(ValueError, match="even"):
        mx.mixup_cutmix(images, labels, jax.random.key(0), num_classes=K)
    with pytest.raises(ValueError, match="float images"):
        mx.mixup_cutmix(jnp.zeros((2, 4, 4, 3), jnp.uint8), labels[:2], jax.random.key(0),
                        num_classes=K)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_soft_target_and_label_smoothing_losses_match_timm_formulas():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, K)).astype(np.float32) * 3
    labels = rng.integers(0, K, size=6)
    targets = timm_mixup_target(labels, K, 0.37, 0.1)
    logp = _log_softmax(logits.astype(np.float64))
    soft = np.mean(np.sum(-targets * logp, -1))  # SoftTargetCrossEntropy
    np.testing.assert_allclose(soft_ce(logits, targets), soft, rtol=1e-5)
    # LabelSmoothingCrossEntropy(0.1): confidence * nll + smoothing * mean(-logp)
    nll = -logp[np.arange(6), labels]
    ls = np.mean(0.9 * nll + 0.1 * -logp.mean(-1))
    got = smoothing_ce(logits, jnp.asarray(labels), 0.1)
    np.testing.assert_allclose(got, ls, rtol=1e-5)
    # ... which is soft-target CE on timm's smoothed one-hot targets,
    smooth = mx.smooth_one_hot(jnp.asarray(labels), K, 0.1)
    np.testing.assert_allclose(soft_ce(logits, smooth), ls, rtol=1e-5)
    # ... and plain cross-entropy at smoothing 0.
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    got0 = smoothing_ce(logits, jnp.asarray(labels), 0.0)
    np.testing.assert_allclose(got0, plain, rtol=1e-5)
