"""mmseg's PhotoMetricDistortion as stateless TensorFlow ops, exact with OpenCV's uint8 HSV.

The host-side distortion (`photometric_distortion`) and the parameter draws the accelerator's
version (`mae_jax.data.photometric.apply_photometric`) takes from the host
(`photometric_params`). Used by `mae_jax.data.seg_transforms.train_transform`.
"""

import tensorflow as tf

from mae_jax.data import photometric as device_ops


def _to_uint8(values: tf.Tensor) -> tf.Tensor:
    # mmseg's convert(): clip to [0, 255] then astype(uint8), which truncates.
    return tf.cast(tf.clip_by_value(values, 0.0, 255.0), tf.uint8)


def rgb_to_hsv_uint8(image: tf.Tensor) -> tf.Tensor:
    """cv2.cvtColor(image, COLOR_RGB2HSV) on uint8: H in 0..179 (degrees / 2), S and V 0..255.

    image: [H, W, 3] uint8 -> [H, W, 3] uint8, bit-exact with OpenCV (its 12-bit fixed point
    with rounded division tables, integer arithmetic)."""
    r, g, b = tf.unstack(tf.cast(image, tf.int32), axis=-1)
    v = tf.maximum(tf.maximum(r, g), b)
    diff = v - tf.minimum(tf.minimum(r, g), b)
    half = 1 << (device_ops.HSV_SHIFT - 1)
    s = tf.bitwise.right_shift(diff * tf.gather(device_ops.SDIV, v) + half, device_ops.HSV_SHIFT)
    h = tf.where(v == r, g - b, tf.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    # An arithmetic shift floors negative values, as C's >> does.
    h = tf.bitwise.right_shift(h * tf.gather(device_ops.HDIV, diff) + half, device_ops.HSV_SHIFT)
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
    s64 = tf.cast(s, tf.float64)

    def one_minus_s_times(x):  # the fused multiply-subtract: exact product, one rounding
        return tf.cast(1.0 - s64 * tf.cast(x, tf.float64), tf.float32)

    p, q, t = v * (1.0 - s), v * one_minus_s_times(h), v * one_minus_s_times(1.0 - h)
    sector = tf.cast(sector, tf.int32)
    rgb = tf.stack(device_ops.sector_rgb(sector, v, p, q, t, tf.where), axis=-1) * 255.0
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


def photometric_params(
    seed,
    *,
    brightness_delta=32,
    contrast_range=(0.5, 1.5),
    saturation_range=(0.5, 1.5),
    hue_delta=18,
):
    """The random draws of mmseg's PhotoMetricDistortion for one example: float32 [7], the
    first seven of `mae_jax.data.photometric.PARAMS` (beta, alpha_before, saturation_on,
    saturation, hue_on, hue_steps, alpha_after); an unapplied brightness has beta 0 and an
    unapplied contrast alpha 1 (both leave uint8 values as they are)."""
    draws = tf.random.stateless_uniform([10], seed)
    apply = draws[:5] < 0.5  # brightness, contrast, saturation, hue, contrast-first
    beta = brightness_delta * (2.0 * draws[5] - 1.0)
    alpha = contrast_range[0] + (contrast_range[1] - contrast_range[0]) * draws[6]
    saturation = saturation_range[0] + (saturation_range[1] - saturation_range[0]) * draws[7]
    # mmseg: randint(-18, 18) (upper exclusive) on OpenCV's 0..180 hue scale.
    hue_steps = tf.floor(draws[8] * (2 * hue_delta)) - hue_delta
    return tf.stack([
        tf.where(apply[0], beta, 0.0),
        tf.where(apply[4] & apply[1], alpha, 1.0),
        tf.cast(apply[2], tf.float32),
        saturation,
        tf.cast(apply[3], tf.float32),
        hue_steps,
        tf.where(~apply[4] & apply[1], alpha, 1.0),
    ])


def photometric_distortion(image, *, seed, **ranges):
    """mmseg PhotoMetricDistortion: brightness, contrast (first or last, at random), saturation,
    hue, each applied with probability 0.5. image: [H, W, 3] uint8 -> [H, W, 3] uint8.
    ranges: `photometric_params`' keyword arguments. (The same on the accelerator, for whole
    batches: `mae_jax.data.photometric.apply_photometric`.)"""
    image = tf.convert_to_tensor(image)
    beta, alpha_before, saturation_on, saturation, hue_on, hue_steps, alpha_after = tf.unstack(
        photometric_params(seed, **ranges))

    def contrast(img, alpha):
        # mmseg's contrast scales pixel values (no mean subtraction, unlike tf.image's).
        return tf.cond(alpha != 1.0, lambda: _to_uint8(tf.cast(img, tf.float32) * alpha),
                       lambda: img)

    image = tf.cond(beta != 0.0, lambda: _to_uint8(tf.cast(image, tf.float32) + beta),
                    lambda: image)
    image = contrast(image, alpha_before)
    # mmseg goes through OpenCV's uint8 HSV (BGR there; the same H, S, V for our RGB).
    image = tf.cond(saturation_on > 0, lambda: adjust_saturation(image, saturation),
                    lambda: image)
    image = tf.cond(hue_on > 0, lambda: adjust_hue(image, hue_steps), lambda: image)
    return contrast(image, alpha_after)
