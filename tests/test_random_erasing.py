"""Random erasing (mae_jax.data.random_erasing) against timm 0.3.2's RandomErasing._erase.

timm's box sampling is written out with Python's ``random`` below and compared statistically
(the streams differ, the distributions must not).
"""

import math
import random

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from mae_jax.data import random_erasing as re_

H, W = 40, 56


def timm_box(rng, height, width, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """timm RandomErasing._erase for one box after the probability check: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < width and h < height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


def _boxes(n, probability=0.25, height=H, width=W, **kwargs):
    """n draws of sample_erasing_boxes (seeds [k, 99]) in one traced map."""
    seeds = tf.stack([tf.range(n), tf.fill([n], 99)], axis=1)

    @tf.function
    def draw(seeds):
        def one(seed):
            active, top, left, h, w = re_.sample_erasing_boxes(
                seed, height, width, probability=probability, **kwargs
            )
            return active[0], top[0], left[0], h[0], w[0]

        return tf.map_fn(one, seeds, fn_output_signature=(tf.bool,) + (tf.int32,) * 4)

    return [t.numpy() for t in draw(seeds)]


def test_erasing_happens_with_probability_0_25():
    active, *_ = _boxes(2000)
    assert abs(active.mean() - 0.25) < 0.04  # binomial sd 0.0097


def test_box_sizes_follow_timms_area_and_log_aspect_sampling():
    active, top, left, h, w = _boxes(3000, probability=1.0)
    rng = random.Random(0)
    ref = [timm_box(rng, H, W) for _ in range(3000)]
    assert active.mean() == pytest.approx(np.mean([r is not None for r in ref]), abs=0.01)
    ref = np.array([r for r in ref if r is not None])
    h, w, top, left = h[active], w[active], top[active], left[active]
    # Ranges: area in [0.02, 1/3] of the image and aspect in [0.3, 1/0.3], up to the rounding
    # of h and w to integers; boxes lie inside the image.
    assert np.all((h + 0.5) * (w + 0.5) >= 0.02 * H * W)
    assert np.all((h - 0.5) * (w - 0.5) <= H * W / 3)
    assert np.all((h + 0.5) / (w - 0.5) >= 0.3) and np.all((h - 0.5) / (w + 0.5) <= 1 / 0.3)
    assert np.all((h < H) & (w < W) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= H) & (left + w <= W))
    # Distributions against timm's: means within 5 standard errors, two-sample KS test.
    for ours, theirs in ((h, ref[:, 2]), (w, ref[:, 3]), (h * w, ref[:, 2] * ref[:, 3]),
                         (top, ref[:, 0]), (left, ref[:, 1])):
        se = theirs.std() * math.sqrt(2 / len(theirs))
        assert abs(ours.mean() - theirs.mean()) < 5 * se
        assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


def test_box_position_is_uniform_over_every_valid_offset_inclusive():
    # Fixed 10 x 10 box (area 100, aspect 1): top in 0..H-10, left in 0..W-10, both inclusive.
    frac = 100 / (H * W)
    active, top, left, h, w = _boxes(3000, probability=1.0, min_area=frac, max_area=frac,
                                     min_aspect=1.0)
    assert active.all() and (h == 10).all() and (w == 10).all()
    counts = np.bincount(top, minlength=H - 9)
    assert counts.size == H - 9 and counts.min() > 0  # 0 and H - 10 both reached
    expected = 3000 / (H - 9)
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))
    assert left.min() == 0 and left.max() == W - 10


def test_no_box_is_erased_when_all_ten_attempts_are_too_large():
    # round(sqrt(0.99 * 20 * 20)) = 20 is never < 20, so every attempt fails, as in timm.
    image = tf.zeros([20, 20, 3])
    for s in range(5):
        out = re_.random_erasing(image, tf.constant([s, 0]), probability=1.0, min_area=0.99,
                                 max_area=0.99, min_aspect=1.0)
        np.testing.assert_array_equal(out.numpy(), 0.0)


def _erase_many(mode, n=40):
    image = tf.fill([H, W, 3], 7.0)  # no N(0, 1) draw is exactly 7
    fn = tf.function(lambda seed: re_.random_erasing(image, seed, probability=1.0, mode=mode))
    return [fn(tf.constant([s, 1])).numpy() for s in range(n)]


def test_pixel_mode_fills_exactly_one_box_with_standard_normal_noise_and_keeps_the_rest():
    noise = []
    for out in _erase_many("pixel"):
        changed = (out != 7.0).any(-1)
        rows, cols = np.nonzero(changed)
        assert rows.size > 0
        box = np.zeros_like(changed)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        np.testing.assert_array_equal(changed, box)  # a full rectangle, nothing outside
        assert (out[~box] == 7.0).all()
        noise.append(out[box].ravel())
    noise = np.concatenate(noise)
    assert noise.size > 5000
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
    assert abs(np.mean(np.abs(noise) < 1.0) - 0.6827) < 0.02


def test_rand_mode_uses_one_normal_colour_per_channel_and_const_mode_zeros():
    for out in _erase_many("rand", n=10):
        box = (out != 7.0).any(-1)
        colours = out[box]
        assert (colours == colours[0]).all()
    for out in _erase_many("const", n=5):
        box = (out != 7.0).any(-1)
        assert box.any() and (out[box] == 0.0).all()


def test_same_seed_same_output_and_it_runs_in_a_tf_data_map():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, H, W, 3)).astype(np.float32)
    seeds = np.stack([np.arange(8), np.full(8, 5)], 1)
    ds = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
        lambda im, s: re_.random_erasing(im, s, probability=0.5), num_parallel_calls=2,
        deterministic=True,
    )
    outs = [o.numpy() for o in ds]
    for img, seed, out in zip(images, seeds, outs, strict=True):
        again = re_.random_erasing(img, seed, probability=0.5).numpy()
        np.testing.assert_array_equal(out, again)
    assert any((o != i).any() for o, i in zip(outs, images, strict=True))
    assert any((o == i).all() for o, i in zip(outs, images, strict=True))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        re_.random_erasing(tf.zeros([8, 8, 3]), tf.constant([0, 0]), mode="noise")
    with pytest.raises(ValueError, match="float"):
        re_.random_erasing(tf.zeros([8, 8, 3], tf.uint8), tf.constant([0, 0]))
