"""Random erasing (mae_jax.classification.erasing) against timm 0.3.2's RandomErasing._erase.

timm's box sampling is written out with Python's ``random`` below and compared statistically
(the streams differ, the distributions must not).
"""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mae_jax.classification import erasing

H, W = 40, 56
# Compiled once per set of options (op-by-op dispatch of the vmapped sampler is slow on CPU).
erase = jax.jit(erasing.random_erasing, static_argnames=(
    "probability", "mode", "min_count", "max_count", "min_area", "max_area", "min_aspect"))


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
    """n draws of sample_erasing_boxes (keys split from one key) in one vmapped call."""
    keys = jax.random.split(jax.random.PRNGKey(99), n)

    @jax.jit
    def draw(keys):
        def one(key):
            return [x[0] for x in erasing.sample_erasing_boxes(
                key, height, width, probability=probability, **kwargs)]

        return jax.vmap(one)(keys)

    return [np.asarray(t) for t in draw(keys)]


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
    images = jnp.zeros([5, 20, 20, 3])
    out = erase(images, jax.random.PRNGKey(0), probability=1.0, min_area=0.99, max_area=0.99,
                min_aspect=1.0)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def _erase_many(mode, n=40):
    images = jnp.full([n, H, W, 3], 7.0)  # no N(0, 1) draw is exactly 7
    return np.asarray(erase(images, jax.random.PRNGKey(1), probability=1.0, mode=mode))


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
    for out in _erase_many("rand")[:10]:
        box = (out != 7.0).any(-1)
        colours = out[box]
        assert (colours == colours[0]).all()
    for out in _erase_many("const")[:5]:
        box = (out != 7.0).any(-1)
        assert box.any() and (out[box] == 0.0).all()


def test_two_boxes_when_count_is_two_and_each_image_draws_its_own():
    images = jnp.full([64, H, W, 3], 7.0)
    out = np.asarray(erase(images, jax.random.PRNGKey(3), probability=1.0, min_count=2,
                           max_count=2, mode="const"))
    erased = (out == 0.0).all(-1)
    # Two boxes of half the area each: the union is rarely one rectangle.
    not_rectangles = 0
    for mask in erased:
        rows, cols = np.nonzero(mask)
        not_rectangles += mask.sum() < (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    assert not_rectangles > 10
    assert len({m.tobytes() for m in erased}) == 64


def test_same_key_same_output_and_probability_half_leaves_some_images_untouched():
    images = jax.random.normal(jax.random.PRNGKey(0), (16, H, W, 3))
    outs = [np.asarray(erase(images, jax.random.PRNGKey(k), probability=0.5)) for k in (5, 5, 6)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert (outs[0] != outs[2]).any()
    changed = (outs[0] != np.asarray(images)).any(axis=(1, 2, 3))
    assert 0 < changed.sum() < 16


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        erasing.random_erasing(jnp.zeros([1, 8, 8, 3]), jax.random.PRNGKey(0), mode="noise")
    with pytest.raises(ValueError, match="float"):
        erasing.random_erasing(jnp.zeros([1, 8, 8, 3], jnp.uint8), jax.random.PRNGKey(0))
