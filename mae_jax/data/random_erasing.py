"""timm's RandomErasing (as MAE fine-tuning uses it) on one normalised image, in TensorFlow.

The official recipe appends ``RandomErasing(0.25, mode='pixel', max_count=1)`` after
``ToTensor() + Normalize(mean, std)``, so it acts on the *normalised* float image. Per image timm:

  * does nothing with probability ``1 - probability`` (``random() > probability``),
  * draws ``count`` in [min_count, max_count] (1 here) boxes; for each box it tries up to 10 times:
    ``target_area = uniform(min_area, max_area) * H * W / count``,
    ``aspect = exp(uniform(log(min_aspect), log(max_aspect)))`` (max_aspect = 1 / min_aspect),
    ``h = int(round(sqrt(target_area * aspect)))``, ``w = int(round(sqrt(target_area / aspect)))``;
    the first attempt with ``w < W and h < H`` is used, at ``top = randint(0, H - h)``,
    ``left = randint(0, W - w)`` (both ends inclusive); if all attempts fail there is no box,
  * fills the box with per-pixel N(0, 1) noise ('pixel'), one N(0, 1) colour per channel
    ('rand') or zeros ('const').

Randomness is stateless (``tf.random.stateless_*`` keyed by a ``[2]`` int seed): same image and
seed give the same output, and everything runs in graph mode inside ``tf.data``. The draws follow
timm's distributions, not its Python RNG stream. Rounding is half-to-even in both (Python
``round`` and ``tf.round``).
"""

import math

import tensorflow as tf

_MODES = ("pixel", "rand", "const")


def sample_erasing_boxes(
    seed,
    height,
    width,
    *,
    probability=0.25,
    min_area=0.02,
    max_area=1 / 3,
    min_aspect=0.3,
    max_aspect=None,
    min_count=1,
    max_count=1,
    max_attempts=10,
):
    """Draws timm's erase boxes for an image of ``height x width``.

    Returns ``(active, top, left, box_h, box_w)``, each ``[max_count]`` (bool / int32): box ``k`` is
    erased iff ``active[k]`` (the image was selected, ``k < count`` and one of the attempts fit).
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if not 0.0 < min_area <= max_area:
        raise ValueError(f"need 0 < min_area <= max_area, got {min_area}, {max_area}")
    if not 1 <= min_count <= max_count:
        raise ValueError(f"need 1 <= min_count <= max_count, got {min_count}, {max_count}")
    max_aspect = max_aspect or 1.0 / min_aspect
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 7)
    h_img = tf.cast(height, tf.float64)
    w_img = tf.cast(width, tf.float64)

    selected = tf.random.stateless_uniform([], seeds[0], dtype=tf.float64) <= probability
    if min_count == max_count:
        count = tf.constant(min_count, tf.int32)
    else:  # random.randint(min_count, max_count), both inclusive
        count = tf.random.stateless_uniform(
            [], seeds[1], minval=min_count, maxval=max_count + 1, dtype=tf.int32
        )
    shape = [max_count, max_attempts]
    area_frac = tf.random.stateless_uniform(
        shape, seeds[2], minval=min_area, maxval=max_area, dtype=tf.float64
    )
    target_area = area_frac * h_img * w_img / tf.cast(count, tf.float64)
    aspect = tf.exp(
        tf.random.stateless_uniform(shape, seeds[3], minval=log_lo, maxval=log_hi, dtype=tf.float64)
    )
    box_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    box_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (box_w < tf.cast(width, tf.int32)) & (box_h < tf.cast(height, tf.int32))
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)  # first True
    found = tf.reduce_any(fits, axis=1)
    box_h = tf.gather(box_h, first, batch_dims=1)
    box_w = tf.gather(box_w, first, batch_dims=1)

    def randint_inclusive(upper, s):  # random.randint(0, upper) for an int32 [max_count] tensor
        u = tf.random.stateless_uniform([max_count], s, dtype=tf.float64)
        n = tf.cast(upper + 1, tf.float64)
        return tf.minimum(tf.cast(tf.floor(u * n), tf.int32), upper)

    top = randint_inclusive(tf.maximum(tf.cast(height, tf.int32) - box_h, 0), seeds[4])
    left = randint_inclusive(tf.maximum(tf.cast(width, tf.int32) - box_w, 0), seeds[5])
    active = selected & found & (tf.range(max_count) < count)
    return active, top, left, box_h, box_w


@tf.autograph.experimental.do_not_convert
def random_erasing(
    image,
    seed,
    *,
    probability=0.25,
    mode="pixel",
    min_area=0.02,
    max_area=1 / 3,
    min_aspect=0.3,
    max_aspect=None,
    min_count=1,
    max_count=1,
    max_attempts=10,
):
    """timm ``RandomErasing(probability, mode=mode, max_count=max_count)`` on one image.

    image: normalised float [H, W, C] tensor (channels last); seed: int [2] tensor. Returns an
    image of the same shape and dtype. Defaults are the MAE fine-tuning ones (``--reprob 0.25
    --remode pixel --recount 1``).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    image = tf.convert_to_tensor(image)
    if not image.dtype.is_floating:
        raise ValueError(f"expected a normalised float [H, W, C] image, got {image.dtype.name}")
    shape = tf.shape(image)
    active, top, left, box_h, box_w = sample_erasing_boxes(
        seed,
        shape[0],
        shape[1],
        probability=probability,
        min_area=min_area,
        max_area=max_area,
        min_aspect=min_aspect,
        max_aspect=max_aspect,
        min_count=min_count,
        max_count=max_count,
        max_attempts=max_attempts,
    )
    noise_seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 1), max_count
    )
    rows = tf.range(shape[0])[:, None, None]
    cols = tf.range(shape[1])[None, :, None]

    def erase():
        out = image
        for k in range(max_count):  # later boxes overwrite earlier ones, as in timm's loop
            inside = (
                active[k]
                & (rows >= top[k])
                & (rows < top[k] + box_h[k])
                & (cols >= left[k])
                & (cols < left[k] + box_w[k])
            )
            if mode == "pixel":
                fill = tf.random.stateless_normal(shape, noise_seeds[k], dtype=image.dtype)
            elif mode == "rand":
                fill = tf.random.stateless_normal(shape[2:], noise_seeds[k], dtype=image.dtype)
                fill = tf.broadcast_to(fill[None, None, :], shape)
            else:
                fill = tf.zeros_like(image)
            out = tf.where(inside, fill, out)
        return out

    result = tf.cond(tf.reduce_any(active), erase, lambda: image)
    result.set_shape(image.shape)
    return result
