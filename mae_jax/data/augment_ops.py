"""The PIL pixel ops timm's RandAugment calls, as TensorFlow graph ops on uint8 [H, W, 3] images.

Every op here reproduces the PIL function timm calls, pixel for pixel where PIL's integer /
float arithmetic allows (see tests/test_randaugment.py): ``ImageOps.autocontrast / equalize /
invert / posterize / solarize``, timm's ``solarize_add`` LUT and ``ImageEnhance.Color / Contrast /
Brightness / Sharpness`` (``Image.blend`` in float32 with truncation). The geometric ops are in
`mae_jax.data.augment_affine`; the RandAugment policy that picks them is
`mae_jax.data.randaugment`.

Posterize with 0 bits (``PosterizeIncreasing`` at magnitude 10, reached when the Gaussian draw
is clipped) gives a black image, as ``ImageOps.posterize``'s LUT did in the Pillow of timm 0.3.2's
time; recent Pillow (13.0) raises on ``bits=0`` instead.
"""

import tensorflow as tf

# ---------------------------------------------------------------------------------------------
# Helpers reproducing PIL internals
# ---------------------------------------------------------------------------------------------


def to_float64(value):
    """float64 tensor; Python numbers go straight to float64 (not through float32)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, tf.float64)
    return tf.constant(value, tf.float64)


def check_image(image):
    """``image`` as a uint8 [H, W, 3] tensor; ValueError naming the dtype or rank otherwise."""
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got dtype {image.dtype.name}")
    if image.shape.rank is not None and image.shape.rank != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got shape {image.shape}")
    return image


def truncate_to_uint8(values):
    """C's ``(UINT8)v`` after PIL's clamp to [0, 255]: truncation of non-negative floats."""
    return tf.cast(tf.floor(tf.clip_by_value(values, 0.0, 255.0)), tf.uint8)


def _blend(degenerate, image, factor):
    """PIL ``Image.blend(degenerate, image, factor)`` on uint8 images.

    PIL computes ``(float)(in1 + alpha * (in2 - in1))`` with ``alpha`` a C float and truncates
    (clamping first when extrapolating); the same float32 arithmetic is used here.
    """
    factor = tf.cast(to_float64(factor), tf.float32)  # C float, as PIL's blend takes it
    base = tf.cast(degenerate, tf.int32)
    diff = tf.cast(tf.cast(image, tf.int32) - base, tf.float32)
    return truncate_to_uint8(tf.cast(base, tf.float32) + factor * diff)


def _luma(image):
    """PIL ``convert("L")`` from RGB: ``(R*19595 + G*38470 + B*7471 + 0x8000) >> 16``."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return tf.bitwise.right_shift(weighted, 16)


def _apply_lut(image, lut):
    """PIL ``image.point(lut)`` with one 256-entry LUT per channel; lut: int [3, 256]."""
    lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)  # PIL's CLIP8 on LUT entries
    channels = tf.cast(tf.transpose(image, [2, 0, 1]), tf.int32)  # [3, H, W]
    mapped = tf.gather(lut, channels, batch_dims=1)
    return tf.transpose(mapped, [1, 2, 0])


# The LUT's 3 x H x W gather, as an XLA program per image size: 0.2 ms instead of TensorFlow's
# 1.2 ms at 224 px (one core; the same values). AutoContrast runs whole under XLA already.
_compiled_lut = tf.function(_apply_lut, jit_compile=True, autograph=False)


def _histograms(image):
    """Per-channel 256-bin histograms, int32 [3, 256] (PIL ``image.histogram()``)."""
    channels = tf.reshape(tf.transpose(tf.cast(image, tf.int32), [2, 0, 1]), [3, -1])
    return tf.math.bincount(channels, minlength=256, maxlength=256, axis=-1)


# ---------------------------------------------------------------------------------------------
# Pixel ops (uint8 [H, W, 3] -> uint8 [H, W, 3])
# ---------------------------------------------------------------------------------------------


def autocontrast(image):
    """``ImageOps.autocontrast(img)``: per channel, stretch [min, max] to [0, 255].

    LUT entry ``int(i * scale + offset)`` clipped to [0, 255] with ``scale = 255 / (hi - lo)``,
    ``offset = -lo * scale`` in float64; channels with ``hi <= lo`` are left unchanged.
    """
    image = check_image(image)
    flat = tf.cast(tf.reshape(image, [-1, 3]), tf.float64)
    lo = tf.reduce_min(flat, axis=0)[:, None]  # [3, 1]
    hi = tf.reduce_max(flat, axis=0)[:, None]
    spread = tf.where(hi > lo, hi - lo, tf.ones_like(hi))
    scale = 255.0 / spread
    offset = -lo * scale
    ramp = tf.range(256, dtype=tf.float64)[None, :]
    stretched = tf.floor(tf.clip_by_value(ramp * scale + offset, 0.0, 255.0))
    lut = tf.where(hi > lo, stretched, tf.broadcast_to(ramp, [3, 256]))
    return _apply_lut(image, tf.cast(lut, tf.int32))


def equalize(image):
    """``ImageOps.equalize(img)``: PIL's per-channel histogram equalisation LUT.

    With ``step = (n - count of the highest present value) // 255``, the LUT is
    ``(step // 2 + pixels below i) // step``; channels with one distinct value or ``step == 0`` are
    left unchanged.
    """
    image = check_image(image)
    hist = _histograms(image)  # [3, 256]
    total = tf.reduce_sum(hist, axis=1, keepdims=True)
    top_value = tf.cast(tf.reduce_max(tf.reshape(image, [-1, 3]), axis=0), tf.int32)
    top_count = tf.gather(hist, top_value, batch_dims=1)[:, None]
    step = (total - top_count) // 255
    below = tf.cumsum(hist, axis=1, exclusive=True)
    safe_step = tf.maximum(step, 1)
    equalized = (safe_step // 2 + below) // safe_step
    distinct = tf.math.count_nonzero(hist, axis=1, keepdims=True)
    keep = (distinct <= 1) | (step == 0)
    identity = tf.broadcast_to(tf.range(256, dtype=hist.dtype)[None, :], [3, 256])
    return _compiled_lut(image, tf.where(keep, identity, equalized))


def invert(image):
    """``ImageOps.invert(img)``: ``255 - x``."""
    return 255 - check_image(image)


def posterize(image, bits):
    """``ImageOps.posterize(img, bits)``: keep the ``bits`` most significant bits (0 <= bits <= 8).

    timm returns the image unchanged for ``bits >= 8``, which this also does.
    """
    image = check_image(image)
    shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def solarize(image, threshold):
    """``ImageOps.solarize(img, threshold)``: invert pixels ``>= threshold``."""
    image = check_image(image)
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, addition, threshold=128):
    """timm's ``solarize_add``: pixels ``< threshold`` get ``min(255, x + addition)``."""
    image = check_image(image)
    x = tf.cast(image, tf.int32)
    added = tf.minimum(255, x + tf.cast(addition, tf.int32))
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), added, x), tf.uint8)


def color(image, factor):
    """``ImageEnhance.Color(img).enhance(factor)``: blend from the luma (``convert("L")``)."""
    image = check_image(image)
    gray = tf.cast(_luma(image), tf.uint8)[..., None]
    return _blend(tf.broadcast_to(gray, tf.shape(image)), image, factor)


def contrast(image, factor):
    """``ImageEnhance.Contrast(img).enhance(factor)``: blend from the mean luma.

    The degenerate image is the constant ``int(mean(L) + 0.5)``.
    """
    image = check_image(image)
    luma = tf.cast(_luma(image), tf.float64)
    mean = tf.floor(tf.reduce_mean(luma) + 0.5)
    degenerate = tf.fill(tf.shape(image), tf.cast(mean, tf.uint8))
    return _blend(degenerate, image, factor)


def brightness(image, factor):
    """``ImageEnhance.Brightness(img).enhance(factor)``: blend from black."""
    image = check_image(image)
    return _blend(tf.zeros_like(image), image, factor)


def smooth(image):
    """``img.filter(ImageFilter.SMOOTH)``: PIL's 3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13 filter.

    Border rows / columns are copied; inside, PIL sums in float32 with its kernel taps divided by
    13 in float32, starting from 0.5 and truncating, in the row order (y+1, y, y-1). The same
    operation order is used here so that results agree exactly. Needs H, W >= 3.
    """
    image = check_image(image)
    x = tf.cast(image, tf.float32)
    edge = tf.constant(1.0, tf.float32) / tf.constant(13.0, tf.float32)
    centre = tf.constant(5.0, tf.float32) / tf.constant(13.0, tf.float32)

    def row(rows, middle):
        return (rows[:, :-2] * edge + rows[:, 1:-1] * middle) + rows[:, 2:] * edge

    total = 0.5 + row(x[2:], edge)
    total = total + row(x[1:-1], centre)
    total = total + row(x[:-2], edge)
    inner = truncate_to_uint8(total)
    middle = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], axis=1)
    return tf.concat([image[:1], middle, image[-1:]], axis=0)


def sharpness(image, factor):
    """``ImageEnhance.Sharpness(img).enhance(factor)``: blend from `smooth` (needs H, W >= 3)."""
    image = check_image(image)
    return _blend(smooth(image), image, factor)
