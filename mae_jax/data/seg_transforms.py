"""mmsegmentation's ADE20K train / test pipelines as stateless TensorFlow ops.

Train (mmseg's `configs/_base_/datasets/ade20k.py`): reduce_zero_label -> Resize(scale (2048, 512),
ratio_range (0.5, 2.0), keep_ratio) -> RandomCrop(512, cat_max_ratio 0.75) -> RandomFlip(0.5) ->
PhotoMetricDistortion -> Normalize -> Pad(512, image 0, label 255).
Test: Resize(scale (2048, 512), keep_ratio) -> Normalize; the label keeps its original size.

Normalize runs on device (`mae_jax.data.constants.normalize_uint8`), so images leave these ops as
uint8 (4x fewer bytes to ship). mmseg pads the NORMALISED image with 0, i.e. with the mean colour:
here the padding is the mean rounded to uint8 (124, 116, 104), 0 after normalising to within
rounding (|error| <= 0.5 / 255 / std).

Every random draw comes from a `seed` ([2] int tensor) through stateless ops, so an example's
augmentation depends only on its seed: that is what makes the input pipeline resumable.
The image stays uint8 throughout, as in mmseg, where OpenCV rounds after every step.
"""

import numpy as np
import tensorflow as tf

from mae_jax.data.constants import IMAGENET_MEAN_UINT8

IGNORE_INDEX = 255


def reduce_zero_label(label: tf.Tensor) -> tf.Tensor:
    """mmseg's reduce_zero_label: raw 0 ("other") -> 255, class c -> c - 1, 255 stays 255.

    label: [H, W] or [H, W, 1] uint8 raw annotation. Returns the same shape and dtype.
    """
    label = tf.convert_to_tensor(label)
    ignored = tf.logical_or(tf.equal(label, 0), tf.equal(label, IGNORE_INDEX))
    return tf.where(ignored, tf.constant(IGNORE_INDEX, label.dtype), label - 1)


def _as_example(image, label) -> tuple[tf.Tensor, tf.Tensor]:
    """Tensors with image [H, W, 3] uint8 and label [H, W] (a trailing 1-channel axis dropped)."""
    image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
    if image.dtype != tf.uint8:
        raise ValueError(f"Expected a uint8 image (decoded JPEG), got {image.dtype}.")
    if label.shape.rank == 3:
        label = label[..., 0]
    return image, label


def rescale_size(height, width, scale) -> tuple[tf.Tensor, tf.Tensor]:
    """mmcv.rescale_size: the (h, w) that fits inside `scale` (long, short edge), keeping ratio.

    height, width: scalar tensors; scale: (long_edge, short_edge) scalars (any order, as mmcv).
    Returns int32 (new_height, new_width).
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    s0 = tf.cast(scale[0], tf.float64)
    s1 = tf.cast(scale[1], tf.float64)
    factor = tf.minimum(
        tf.maximum(s0, s1) / tf.maximum(h, w), tf.minimum(s0, s1) / tf.minimum(h, w)
    )
    # mmcv rounds with int(x + 0.5).
    new_h = tf.cast(tf.floor(h * factor + 0.5), tf.int32)
    new_w = tf.cast(tf.floor(w * factor + 0.5), tf.int32)
    return tf.maximum(new_h, 1), tf.maximum(new_w, 1)


def resize_image(image: tf.Tensor, size) -> tf.Tensor:
    """Bilinear resize (half-pixel centres, no antialias, like cv2.INTER_LINEAR), back to uint8.

    image: [H, W, 3] uint8. size: (h, w). Returns [h, w, 3] uint8.
    """
    resized = tf.image.resize(image, size, method="bilinear", antialias=False)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def _nearest_sources(in_size, out_size) -> tf.Tensor:
    """cv2 INTER_NEAREST's source index of each output index: min(floor(dst * (1 / (out / in))),
    in - 1), in float64 as OpenCV computes it (its `resizeNN`). [out_size] int32."""
    in_f = tf.cast(in_size, tf.float64)
    inverse = 1.0 / (tf.cast(out_size, tf.float64) / in_f)
    source = tf.floor(tf.cast(tf.range(out_size), tf.float64) * inverse)
    return tf.cast(tf.minimum(source, in_f - 1.0), tf.int32)


def resize_label(label: tf.Tensor, size) -> tf.Tensor:
    """mmcv.imresize(label, size, interpolation="nearest") (cv2.INTER_NEAREST), exactly.

    label: [H, W] -> [h, w], dtype kept. cv2 picks source floor(dst * H / h) (no half-pixel
    centre), half a pixel off the bilinear image resize; mmseg trains with that, so we do too.
    """
    label = tf.convert_to_tensor(label)
    shape = tf.shape(label)
    rows = tf.gather(label, _nearest_sources(shape[0], size[0]), axis=0)
    return tf.gather(rows, _nearest_sources(shape[1], size[1]), axis=1)


def random_rescale(image, label, *, seed, scale=(2048, 512), ratio_range=(0.5, 2.0)):
    """mmseg Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True).

    image: [H, W, 3] uint8; label: [H, W]. Returns the rescaled pair.
    """
    image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
    ratio = tf.random.stateless_uniform([], seed, ratio_range[0], ratio_range[1], dtype=tf.float64)
    # mmseg: scale = int(scale[0] * ratio), int(scale[1] * ratio).
    target = (tf.floor(scale[0] * ratio), tf.floor(scale[1] * ratio))
    shape = tf.shape(image)
    size = rescale_size(shape[0], shape[1], target)
    return resize_image(image, size), resize_label(label, size)


def category_ratio_ok(label_crop, *, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX):
    """mmseg's crop test: >1 class present and the largest covers < cat_max_ratio of the
    non-ignored pixels. label_crop: [h, w] integer. Returns a scalar bool."""
    flat = tf.cast(tf.reshape(label_crop, [-1]), tf.int32)
    flat = tf.boolean_mask(flat, tf.not_equal(flat, ignore_index))
    counts = tf.math.bincount(flat, minlength=256)
    total = tf.reduce_sum(counts)
    present = tf.math.count_nonzero(counts)
    largest = tf.cast(tf.reduce_max(counts), tf.float64)
    ratio = largest / tf.maximum(tf.cast(total, tf.float64), 1.0)
    return tf.logical_and(present > 1, ratio < cat_max_ratio)


def random_crop_with_category_ratio(
    image,
    label,
    *,
    crop_size,
    seed,
    cat_max_ratio=0.75,
    max_tries=10,
    ignore_index=IGNORE_INDEX,
):
    """mmseg RandomCrop(crop_size, cat_max_ratio): try up to `max_tries` windows and keep the
    first one that passes `category_ratio_ok`; if none does, keep the next random window (as
    mmseg does). Windows larger than the image are clipped to it (padding comes later).

    image: [H, W, C]; label: [H, W]; crop_size: int or (h, w); seed: [2] int.
    Returns image [min(H, ch), min(W, cw), C] and the matching label.
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
    shape = tf.shape(label)
    margin_h = tf.maximum(shape[0] - crop_h, 0)
    margin_w = tf.maximum(shape[1] - crop_w, 0)
    out_h = tf.minimum(shape[0], crop_h)
    out_w = tf.minimum(shape[1], crop_w)
    # All candidate offsets up front: attempt i uses row i whatever happened before.
    draws = tf.random.stateless_uniform([max_tries + 1, 2], seed, dtype=tf.float64)
    offsets_h = tf.cast(draws[:, 0] * tf.cast(margin_h + 1, tf.float64), tf.int32)
    offsets_w = tf.cast(draws[:, 1] * tf.cast(margin_w + 1, tf.float64), tf.int32)

    def window(i):
        return label[offsets_h[i] : offsets_h[i] + out_h, offsets_w[i] : offsets_w[i] + out_w]

    def keep_trying(i):
        return tf.logical_and(
            i < max_tries,
            tf.logical_not(
                category_ratio_ok(window(i), cat_max_ratio=cat_max_ratio, ignore_index=ignore_index)
            ),
        )

    if cat_max_ratio < 1.0:
        (chosen,) = tf.while_loop(keep_trying, lambda i: (i + 1,), (tf.constant(0),))
    else:
        chosen = tf.constant(0)
    top, left = offsets_h[chosen], offsets_w[chosen]
    window_image = image[top : top + out_h, left : left + out_w]
    return window_image, label[top : top + out_h, left : left + out_w]


def _to_uint8(values: tf.Tensor) -> tf.Tensor:
    # mmseg's convert(): clip to [0, 255] then astype(uint8), which truncates.
    return tf.cast(tf.clip_by_value(values, 0.0, 255.0), tf.uint8)


# OpenCV's uint8 RGB -> HSV (color_hsv: RGB2HSV_b): 12-bit fixed point with rounded tables.
_HSV_SHIFT = 12
_DIVISORS = np.arange(1, 256, dtype=np.float64)
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _DIVISORS)]).astype(np.int32)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * _DIVISORS))]).astype(np.int32)
# HSV2RGB_native's sector table, reordered to (r, g, b) picks from (v, p, q, t).
_SECTORS = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], np.int32)


def rgb_to_hsv_uint8(image: tf.Tensor) -> tf.Tensor:
    """cv2.cvtColor(image, COLOR_RGB2HSV) on uint8: H in 0..179 (degrees / 2), S and V 0..255.

    image: [H, W, 3] uint8 -> [H, W, 3] uint8, bit-exact with OpenCV (integer arithmetic)."""
    r, g, b = tf.unstack(tf.cast(image, tf.int32), axis=-1)
    v = tf.maximum(tf.maximum(r, g), b)
    diff = v - tf.minimum(tf.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * tf.gather(_SDIV, v) + half) // (1 << _HSV_SHIFT)
    h = tf.where(v == r, g - b, tf.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * tf.gather(_HDIV, diff) + half) // (1 << _HSV_SHIFT)  # floor = C's >> on negatives
    h = tf.where(h < 0, h + 180, h)
    return tf.cast(tf.stack([h, s, v], axis=-1), tf.uint8)


def hsv_to_rgb_uint8(hsv: tf.Tensor) -> tf.Tensor:
    """cv2.cvtColor(hsv, COLOR_HSV2RGB) on uint8, as OpenCV's vector code computes it (every
    pixel of an image but a tail of < 64): float32 HSV2RGB on S / 255 and V / 255 with
    `1 - s * h` fused (one rounding), times 255, TRUNCATED. (Its scalar tail rounds instead.)
    Bit-exact with opencv-python-headless 4.10 and 5.0 on all 180 x 256 x 256 inputs.

    hsv: [H, W, 3] uint8 with H in 0..179 -> [H, W, 3] uint8 RGB."""
    h, s, v = tf.unstack(tf.cast(hsv, tf.float32), axis=-1)
    h = h * tf.constant(6.0 / 180.0, tf.float32)
    s = s * tf.constant(1.0 / 255.0, tf.float32)
    v = v * tf.constant(1.0 / 255.0, tf.float32)
    sector = tf.floor(h)
    h -= sector

    def one_minus_s_times(x):  # the fused multiply-subtract: exact product, one rounding
        return tf.cast(1.0 - tf.cast(s, tf.float64) * tf.cast(x, tf.float64), tf.float32)

    table = tf.stack([v, v * (1.0 - s), v * one_minus_s_times(h), v * one_minus_s_times(1.0 - h)],
                     axis=-1)
    picks = tf.gather(_SECTORS, tf.cast(sector, tf.int32))
    rgb = tf.gather(table, picks, batch_dims=2) * 255.0
    return tf.cast(tf.clip_by_value(rgb, 0.0, 255.0), tf.uint8)  # the cast truncates


def adjust_saturation(image: tf.Tensor, alpha) -> tf.Tensor:
    """mmseg's saturation step: S of OpenCV's uint8 HSV times alpha (float32, clipped, truncated).

    image: [H, W, 3] uint8 RGB -> the same."""
    h, s, v = tf.unstack(rgb_to_hsv_uint8(image), axis=-1)
    s = _to_uint8(tf.cast(s, tf.float32) * alpha)
    return hsv_to_rgb_uint8(tf.stack([h, s, v], axis=-1))


def adjust_hue(image: tf.Tensor, steps) -> tf.Tensor:
    """mmseg's hue step: (H + steps) mod 180 on OpenCV's uint8 HSV (steps in 2-degree units).

    image: [H, W, 3] uint8 RGB -> the same."""
    h, s, v = tf.unstack(rgb_to_hsv_uint8(image), axis=-1)
    h = tf.math.floormod(tf.cast(h, tf.int32) + tf.cast(steps, tf.int32), 180)
    return hsv_to_rgb_uint8(tf.stack([tf.cast(h, tf.uint8), s, v], axis=-1))


def photometric_distortion(
    image,
    *,
    seed,
    brightness_delta=32,
    contrast_range=(0.5, 1.5),
    saturation_range=(0.5, 1.5),
    hue_delta=18,
):
    """mmseg PhotoMetricDistortion: brightness, contrast (first or last, at random), saturation,
    hue, each applied with probability 0.5. image: [H, W, 3] uint8 -> [H, W, 3] uint8."""
    image = tf.convert_to_tensor(image)
    draws = tf.random.stateless_uniform([10], seed)
    apply = draws[:5] < 0.5  # brightness, contrast, saturation, hue, contrast-first
    beta = brightness_delta * (2.0 * draws[5] - 1.0)
    alpha = contrast_range[0] + (contrast_range[1] - contrast_range[0]) * draws[6]
    saturation = saturation_range[0] + (saturation_range[1] - saturation_range[0]) * draws[7]
    # mmseg: randint(-18, 18) (upper exclusive) on OpenCV's 0..180 hue scale.
    hue_steps = tf.floor(draws[8] * (2 * hue_delta)) - hue_delta

    def contrast(img):
        # mmseg's contrast scales pixel values (no mean subtraction, unlike tf.image's).
        return _to_uint8(tf.cast(img, tf.float32) * alpha)

    image = tf.cond(apply[0], lambda: _to_uint8(tf.cast(image, tf.float32) + beta), lambda: image)
    image = tf.cond(apply[4] & apply[1], lambda: contrast(image), lambda: image)
    # mmseg goes through OpenCV's uint8 HSV (BGR there; the same H, S, V for our RGB).
    image = tf.cond(apply[2], lambda: adjust_saturation(image, saturation), lambda: image)
    image = tf.cond(apply[3], lambda: adjust_hue(image, hue_steps), lambda: image)
    image = tf.cond(~apply[4] & apply[1], lambda: contrast(image), lambda: image)
    return image


def train_transform(
    image,
    label,
    *,
    seed,
    crop_size=512,
    scale=(2048, 512),
    ratio_range=(0.5, 2.0),
    cat_max_ratio=0.75,
    flip=True,
    photometric=True,
):
    """The full mmseg ADE20K train pipeline on one example.

    image: [H, W, 3] uint8 RGB; label: [H, W] or [H, W, 1] uint8 RAW annotation (0 = other).
    seed: [2] int. Returns image uint8 [crop, crop, 3] (padded with the mean colour; normalise
    on device) and label int32 [crop, crop] (reduced, padded with 255).
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    image, label = _as_example(image, label)
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    label = reduce_zero_label(label)
    image, label = random_rescale(image, label, seed=seeds[0], scale=scale, ratio_range=ratio_range)
    image, label = random_crop_with_category_ratio(
        image, label, crop_size=(crop_h, crop_w), seed=seeds[1], cat_max_ratio=cat_max_ratio
    )
    if flip:
        flipped = tf.random.stateless_uniform([], seeds[2]) < 0.5
        image = tf.cond(flipped, lambda: image[:, ::-1], lambda: image)
        label = tf.cond(flipped, lambda: label[:, ::-1], lambda: label)
    if photometric:
        image = photometric_distortion(image, seed=seeds[3])
    # Pad at the bottom / right, as mmcv.impad does; one channel at a time (per-channel value).
    pad_h = crop_h - tf.shape(label)[0]
    pad_w = crop_w - tf.shape(label)[1]
    image = tf.stack([
        tf.pad(image[..., c], [[0, pad_h], [0, pad_w]], constant_values=value)
        for c, value in enumerate(IMAGENET_MEAN_UINT8)
    ], axis=-1)
    label = tf.pad(tf.cast(label, tf.int32), [[0, pad_h], [0, pad_w]], constant_values=IGNORE_INDEX)
    return tf.ensure_shape(image, [crop_h, crop_w, 3]), tf.ensure_shape(label, [crop_h, crop_w])


def eval_transform(image, label, *, scale=(2048, 512)):
    """mmseg's test pipeline: resize to fit `scale` keeping ratio (normalise on device).

    image: [H, W, 3] uint8; label: [H, W] or [H, W, 1] uint8 raw.
    Returns image uint8 [h, w, 3] and label int32 [H, W] (reduced, ORIGINAL size).
    """
    image, label = _as_example(image, label)
    shape = tf.shape(image)
    size = rescale_size(shape[0], shape[1], scale)
    image = resize_image(image, size)
    return image, tf.cast(reduce_zero_label(label), tf.int32)
