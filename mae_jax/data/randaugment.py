"""RandAugment as timm 0.3.2 builds it for MAE fine-tuning, in TensorFlow graph ops.

The official MAE fine-tuning recipe (``main_finetune.py`` -> ``util/datasets.py``) calls timm's
``create_transform(..., auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
mean=IMAGENET_DEFAULT_MEAN)``, which gives ``rand_augment_transform('rand-m9-mstd0.5-inc1',
hparams)`` with ``translate_const=int(0.45 * img_size)``, ``img_mean=(124, 116, 104)`` (the fill
colour) and bicubic resampling. Per image that transform:

  * picks ``num_layers`` (2) ops uniformly *with replacement* from the 15 "increasing" ops
    (``_RAND_INCREASING_TRANSFORMS``),
  * applies each with probability 0.5,
  * draws the op's magnitude from ``gauss(9, 0.5)`` clipped to [0, 10],
  * maps the magnitude to the op's argument (``_LEVEL_TO_ARG``), negating signed arguments with
    probability 0.5 (``_randomly_negate``),
  * runs the op with PIL on the uint8 image.

Every op here is written to reproduce the PIL function timm calls, pixel for pixel where PIL's
integer / float arithmetic allows (see tests/test_randaugment.py): ``ImageOps.autocontrast /
equalize / invert / posterize / solarize``, timm's ``solarize_add`` LUT, ``ImageEnhance.Color /
Contrast / Brightness / Sharpness`` (``Image.blend`` in float32 with truncation), and
``Image.transform(AFFINE)`` / ``Image.rotate`` with PIL's own bicubic kernel (a = -1, clamped
edges, pixel-centre coordinates, samples whose centre falls outside the image take the fill
colour, truncation to uint8).

Posterize with 0 bits (``PosterizeIncreasing`` at magnitude 10, reached when the Gaussian draw
is clipped) gives a black image, as ``ImageOps.posterize``'s LUT did in the Pillow of timm 0.3.2's
time; recent Pillow (13.0) raises on ``bits=0`` instead.

Translation: timm's RandAugment op lists use ``TranslateXRel`` / ``TranslateYRel`` (shift =
``0.45 * level / 10`` of the image width / height, i.e. up to 100.8 px at 224), *not* the
absolute ``translate_const`` variant; ``translate_const`` is only read by the AutoAugment
policies. This module follows the op lists.

Randomness comes from ``tf.random.stateless_*`` ops keyed by a ``[2]`` integer seed, so
``rand_augment`` is deterministic in (image, seed), runs inside ``tf.data`` maps and
``tf.function`` (graph control flow only: ``tf.while_loop`` / ``tf.cond`` / ``tf.switch_case``)
and never calls back into Python per image. The random draws follow timm's distributions, not
its Python RNG stream.
"""

import math
import re

import tensorflow as tf

from mae_jax.data.constants import IMAGENET_MEAN

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL: magnitudes live in [0, 10]


def fill_from_mean(mean=IMAGENET_MEAN):
    """timm's ``img_mean`` hparam: ``tuple(min(255, round(255 * x)) for x in mean)``.

    For the ImageNet mean this is (124, 116, 104), the colour geometric ops fill with.
    """
    return tuple(min(255, round(255 * x)) for x in mean)


DEFAULT_FILL = fill_from_mean()

# timm's op lists (the order does not matter for uniform choice; it is the dispatch order here).
RAND_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


# ---------------------------------------------------------------------------------------------
# Config string
# ---------------------------------------------------------------------------------------------


def parse_rand_augment(config: str) -> dict:
    """Parses a timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``.

    Returns keyword arguments for `rand_augment`: ``num_layers`` (``n``, default 2),
    ``magnitude`` (``m``, default 10), ``magnitude_std`` (``mstd``, default 0) and
    ``increasing`` (``inc``, default False). Raises ValueError for anything else: other
    policies, the op-weight section ``w`` (timm's non-uniform op choice, not implemented), sections
    without a value, unknown keys and malformed numbers.

    Difference from timm: timm evaluates ``bool("0")`` for ``inc0`` (True), so in timm any ``inc``
    section turns on the increasing ops; here ``inc0`` means off. The official ``inc1`` is the same.
    """
    if not isinstance(config, str) or not config:
        raise ValueError(f"RandAugment config must be a non-empty string, got {config!r}")
    sections = config.split("-")
    if sections[0] != "rand":
        raise ValueError(
            f"unsupported augmentation {config!r}: only timm RandAugment strings starting with "
            "'rand' (e.g. 'rand-m9-mstd0.5-inc1') are supported"
        )
    out = dict(num_layers=2, magnitude=int(MAX_LEVEL), magnitude_std=0.0, increasing=False)
    for section in sections[1:]:
        parts = re.split(r"(\d.*)", section)
        if len(parts) < 2:
            raise ValueError(f"RandAugment config {config!r}: section {section!r} has no value")
        key, val = parts[:2]
        try:
            if key == "m":
                out["magnitude"] = int(val)
            elif key == "n":
                out["num_layers"] = int(val)
            elif key == "mstd":
                out["magnitude_std"] = float(val)
            elif key == "inc":
                out["increasing"] = int(val) != 0
            elif key == "w":
                raise ValueError(
                    f"RandAugment config {config!r}: op weights ('w') are not supported"
                )
            else:
                raise ValueError(
                    f"RandAugment config {config!r}: unknown section {section!r} "
                    "(supported: m<int>, n<int>, mstd<float>, inc<0|1>)"
                )
        except ValueError as e:
            if "RandAugment config" in str(e):
                raise
            raise ValueError(f"RandAugment config {config!r}: bad value in {section!r}") from e
    return out


# ---------------------------------------------------------------------------------------------
# Helpers reproducing PIL internals
# ---------------------------------------------------------------------------------------------


def _f64(value):
    """float64 tensor; Python numbers go straight to float64 (not through float32)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, tf.float64)
    return tf.constant(value, tf.float64)


def _check_image(image):
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got dtype {image.dtype.name}")
    if image.shape.rank is not None and image.shape.rank != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got shape {image.shape}")
    return image


def _truncate_to_uint8(values):
    """C's ``(UINT8)v`` after PIL's clamp to [0, 255]: truncation of non-negative floats."""
    return tf.cast(tf.floor(tf.clip_by_value(values, 0.0, 255.0)), tf.uint8)


def _blend(degenerate, image, factor):
    """PIL ``Image.blend(degenerate, image, factor)`` on uint8 images.

    PIL computes ``(float)(in1 + alpha * (in2 - in1))`` with ``alpha`` a C float and truncates
    (clamping first when extrapolating); the same float32 arithmetic is used here.
    """
    factor = tf.cast(_f64(factor), tf.float32)  # C float, as PIL's blend takes it
    base = tf.cast(degenerate, tf.int32)
    diff = tf.cast(tf.cast(image, tf.int32) - base, tf.float32)
    return _truncate_to_uint8(tf.cast(base, tf.float32) + factor * diff)


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
    image = _check_image(image)
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
    image = _check_image(image)
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
    return _apply_lut(image, tf.where(keep, identity, equalized))


def invert(image):
    """``ImageOps.invert(img)``: ``255 - x``."""
    return 255 - _check_image(image)


def posterize(image, bits):
    """``ImageOps.posterize(img, bits)``: keep the ``bits`` most significant bits (0 <= bits <= 8).

    timm returns the image unchanged for ``bits >= 8``, which this also does.
    """
    image = _check_image(image)
    shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def solarize(image, threshold):
    """``ImageOps.solarize(img, threshold)``: invert pixels ``>= threshold``."""
    image = _check_image(image)
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, addition, threshold=128):
    """timm's ``solarize_add``: pixels ``< threshold`` get ``min(255, x + addition)``."""
    image = _check_image(image)
    x = tf.cast(image, tf.int32)
    added = tf.minimum(255, x + tf.cast(addition, tf.int32))
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), added, x), tf.uint8)


def color(image, factor):
    """``ImageEnhance.Color(img).enhance(factor)``: blend from the luma (``convert("L")``)."""
    image = _check_image(image)
    gray = tf.cast(_luma(image), tf.uint8)[..., None]
    return _blend(tf.broadcast_to(gray, tf.shape(image)), image, factor)


def contrast(image, factor):
    """``ImageEnhance.Contrast(img).enhance(factor)``: blend from the mean luma.

    The degenerate image is the constant ``int(mean(L) + 0.5)``.
    """
    image = _check_image(image)
    luma = tf.cast(_luma(image), tf.float64)
    mean = tf.floor(tf.reduce_mean(luma) + 0.5)
    degenerate = tf.fill(tf.shape(image), tf.cast(mean, tf.uint8))
    return _blend(degenerate, image, factor)


def brightness(image, factor):
    """``ImageEnhance.Brightness(img).enhance(factor)``: blend from black."""
    image = _check_image(image)
    return _blend(tf.zeros_like(image), image, factor)


def smooth(image):
    """``img.filter(ImageFilter.SMOOTH)``: PIL's 3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13 filter.

    Border rows / columns are copied; inside, PIL sums in float32 with its kernel taps divided by
    13 in float32, starting from 0.5 and truncating, in the row order (y+1, y, y-1). The same
    operation order is used here so that results agree exactly. Needs H, W >= 3.
    """
    image = _check_image(image)
    x = tf.cast(image, tf.float32)
    edge = tf.constant(1.0, tf.float32) / tf.constant(13.0, tf.float32)
    centre = tf.constant(5.0, tf.float32) / tf.constant(13.0, tf.float32)

    def row(rows, middle):
        return (rows[:, :-2] * edge + rows[:, 1:-1] * middle) + rows[:, 2:] * edge

    total = 0.5 + row(x[2:], edge)
    total = total + row(x[1:-1], centre)
    total = total + row(x[:-2], edge)
    inner = _truncate_to_uint8(total)
    middle = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], axis=1)
    return tf.concat([image[:1], middle, image[-1:]], axis=0)


def sharpness(image, factor):
    """``ImageEnhance.Sharpness(img).enhance(factor)``: blend from `smooth` (needs H, W >= 3)."""
    image = _check_image(image)
    return _blend(smooth(image), image, factor)


# ---------------------------------------------------------------------------------------------
# Geometric ops: PIL affine transform with PIL's bicubic filter
# ---------------------------------------------------------------------------------------------


def _pil_cubic(v1, v2, v3, v4, d):
    """PIL Geometry.c ``BICUBIC`` (the a = -1 kernel), with its exact operation order."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


def affine(image, matrix, fill=DEFAULT_FILL):
    """``img.transform(img.size, Image.AFFINE, matrix, resample=BICUBIC, fillcolor=fill)``.

    ``matrix = (a, b, c, d, e, f)`` maps an output pixel centre ``(x + .5, y + .5)`` to the input
    point ``(a x' + b y' + c, d x' + e y' + f)``. As in PIL: points outside ``[0, W) x [0, H)``
    get ``fill``; otherwise the 4x4 neighbourhood around the point shifted by -0.5 is read with
    clamped indices, interpolated with PIL's a = -1 cubic (rows first, then the column), clamped
    to [0, 255] and truncated. Computed in float64 like PIL.
    """
    image = _check_image(image)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    a0, a1, a2, a3, a4, a5 = tf.unstack(_f64(matrix), num=6)
    wf = tf.cast(width, tf.float64)
    hf = tf.cast(height, tf.float64)
    xs = (tf.range(wf, dtype=tf.float64) + 0.5)[None, :]
    ys = (tf.range(hf, dtype=tf.float64) + 0.5)[:, None]
    x_in = a0 * xs + a1 * ys + a2  # [H, W]
    y_in = a3 * xs + a4 * ys + a5
    inside = (x_in >= 0.0) & (x_in < wf) & (y_in >= 0.0) & (y_in < hf)
    # Clip far-away (filled) points so the integer casts below stay in range.
    x_in = tf.clip_by_value(x_in, -8.0, wf + 8.0) - 0.5
    y_in = tf.clip_by_value(y_in, -8.0, hf + 8.0) - 0.5
    x_floor = tf.floor(x_in)
    y_floor = tf.floor(y_in)
    dx = (x_in - x_floor)[..., None, None]
    dy = (y_in - y_floor)[..., None]
    x0 = tf.cast(x_floor, tf.int32) - 1
    y0 = tf.cast(y_floor, tf.int32) - 1
    taps = tf.range(4, dtype=tf.int32)
    cols = tf.clip_by_value(x0[..., None] + taps, 0, width - 1)  # [H, W, 4]
    rows = tf.clip_by_value(y0[..., None] + taps, 0, height - 1) * width
    index = rows[..., :, None] + cols[..., None, :]  # [H, W, 4 rows, 4 cols]
    grid = tf.cast(tf.gather(tf.reshape(image, [-1, 3]), index), tf.float64)  # [H, W, 4, 4, 3]
    # PIL interpolates each of the 4 rows along x first, then the 4 results along y.
    along_x = _pil_cubic(*tf.unstack(grid, num=4, axis=3), dx)  # [H, W, 4, 3]
    values = _pil_cubic(*tf.unstack(along_x, num=4, axis=2), dy)  # [H, W, 3]
    out = _truncate_to_uint8(values)
    fill = tf.cast(tf.reshape(tf.convert_to_tensor(fill), [1, 1, 3]), tf.uint8)
    return tf.where(inside[..., None], out, fill)


def _round15(x):
    # Python's round(x, 15) as PIL applies it to the rotation matrix entries (up to 1 ulp).
    return tf.round(x * 1e15) / 1e15


def rotation_matrix(degrees, height, width):
    """The affine matrix PIL's ``Image.rotate`` builds (no expand, centre ``(W / 2, H / 2)``)."""
    cx = tf.cast(width, tf.float64) / 2.0
    cy = tf.cast(height, tf.float64) / 2.0
    angle = tf.math.floormod(_f64(degrees), 360.0)  # PIL: angle % 360.0
    angle = -(angle * (math.pi / 180.0))  # PIL: -math.radians(angle)
    cos = _round15(tf.cos(angle))
    sin = _round15(tf.sin(angle))
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return tf.stack([cos, sin, c, -sin, cos, f])


def _matrix(a, b, c, d, e, f):
    values = [_f64(v) for v in (a, b, c, d, e, f)]
    return tf.stack(values)


def shear_x_matrix(factor):
    return _matrix(1.0, factor, 0.0, 0.0, 1.0, 0.0)


def shear_y_matrix(factor):
    return _matrix(1.0, 0.0, 0.0, factor, 1.0, 0.0)


def translate_x_matrix(pixels):
    return _matrix(1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def translate_y_matrix(pixels):
    return _matrix(1.0, 0.0, 0.0, 0.0, 1.0, pixels)


def rotate(image, degrees, fill=DEFAULT_FILL):
    """``img.rotate(degrees, resample=BICUBIC, fillcolor=fill)``: counter-clockwise about the
    image centre ``(W / 2, H / 2)``, same size, with PIL's own matrix formula."""
    image = _check_image(image)
    shape = tf.shape(image)
    return affine(image, rotation_matrix(degrees, shape[0], shape[1]), fill)


def shear_x(image, factor, fill=DEFAULT_FILL):
    """timm ``shear_x``: affine ``(1, factor, 0, 0, 1, 0)`` (shear about the top-left corner)."""
    return affine(image, shear_x_matrix(factor), fill)


def shear_y(image, factor, fill=DEFAULT_FILL):
    """timm ``shear_y``: affine ``(1, 0, 0, factor, 1, 0)``."""
    return affine(image, shear_y_matrix(factor), fill)


def translate_x(image, pixels, fill=DEFAULT_FILL):
    """timm ``translate_x_abs``: affine ``(1, 0, pixels, 0, 1, 0)`` (content moves left for
    positive ``pixels``); fractional shifts are bicubic-interpolated like PIL."""
    return affine(image, translate_x_matrix(pixels), fill)


def translate_y(image, pixels, fill=DEFAULT_FILL):
    """timm ``translate_y_abs``: affine ``(1, 0, 0, 0, 1, pixels)``."""
    return affine(image, translate_y_matrix(pixels), fill)


# ---------------------------------------------------------------------------------------------
# Magnitude -> argument (timm's _LEVEL_TO_ARG), on float64 level tensors
# ---------------------------------------------------------------------------------------------


def _signed(value, negate):
    return tf.where(tf.cast(negate, tf.bool), -value, value)


def rotate_level_to_arg(level, negate):
    """Degrees in [-30, 30]: ``level / 10 * 30``, negated when ``negate``."""
    return _signed(_f64(level) / MAX_LEVEL * 30.0, negate)


def shear_level_to_arg(level, negate):
    """Shear factor in [-0.3, 0.3]: ``level / 10 * 0.3``, negated when ``negate``."""
    return _signed(_f64(level) / MAX_LEVEL * 0.3, negate)


def translate_rel_level_to_arg(level, negate, translate_pct=0.45):
    """Fraction of the image size in [-0.45, 0.45]: ``level / 10 * translate_pct``, signed."""
    return _signed(_f64(level) / MAX_LEVEL * translate_pct, negate)


def translate_abs_level_to_arg(level, negate, translate_const=100):
    """Pixels ``level / 10 * translate_const``, signed (timm's AutoAugment translate; unused by
    RandAugment, kept for completeness)."""
    return _signed(_f64(level) / MAX_LEVEL * float(translate_const), negate)


def enhance_level_to_arg(level):
    """Enhance factor in [0.1, 1.9]: ``level / 10 * 1.8 + 0.1`` (non-increasing ops)."""
    return _f64(level) / MAX_LEVEL * 1.8 + 0.1


def enhance_increasing_level_to_arg(level, negate):
    """Enhance factor ``1 +- level / 10 * 0.9`` in [0.1, 1.9] (timm's "Increasing" ops)."""
    return 1.0 + _signed(_f64(level) / MAX_LEVEL * 0.9, negate)


def posterize_level_to_arg(level):
    """Bits kept ``int(level / 10 * 4)`` in [0, 4] (TPU EfficientNet variant)."""
    return tf.cast(tf.floor(_f64(level) / MAX_LEVEL * 4.0), tf.int32)


def posterize_increasing_level_to_arg(level):
    """Bits kept ``4 - int(level / 10 * 4)`` in [4, 0]."""
    return 4 - posterize_level_to_arg(level)


def solarize_level_to_arg(level):
    """Threshold ``int(level / 10 * 256)`` in [0, 256]."""
    return tf.cast(tf.floor(_f64(level) / MAX_LEVEL * 256.0), tf.int32)


def solarize_increasing_level_to_arg(level):
    """Threshold ``256 - int(level / 10 * 256)`` in [256, 0]."""
    return 256 - solarize_level_to_arg(level)


def solarize_add_level_to_arg(level):
    """Addition ``int(level / 10 * 110)`` in [0, 110] (threshold stays 128)."""
    return tf.cast(tf.floor(_f64(level) / MAX_LEVEL * 110.0), tf.int32)


_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _geometric_matrix(name, height, width, level, negate, translate_pct):
    """Affine matrix of a geometric timm op at ``level`` (level_fn then the op's matrix)."""
    if name == "Rotate":
        return rotation_matrix(rotate_level_to_arg(level, negate), height, width)
    if name == "ShearX":
        return shear_x_matrix(shear_level_to_arg(level, negate))
    if name == "ShearY":
        return shear_y_matrix(shear_level_to_arg(level, negate))
    # timm translate_*_rel: pixels = pct * img.size[0] (width) for x, img.size[1] (height) for y.
    pct = translate_rel_level_to_arg(level, negate, translate_pct)
    if name == "TranslateXRel":
        return translate_x_matrix(pct * tf.cast(width, tf.float64))
    if name == "TranslateYRel":
        return translate_y_matrix(pct * tf.cast(height, tf.float64))
    raise ValueError(f"{name!r} is not a geometric op")


def _pixel_op(name, image, level, negate):
    """A non-geometric timm op at ``level`` (timm's AugmentOp: level_fn then the PIL op)."""
    ops = {
        "AutoContrast": lambda: autocontrast(image),
        "Equalize": lambda: equalize(image),
        "Invert": lambda: invert(image),
        "Posterize": lambda: posterize(image, posterize_level_to_arg(level)),
        "PosterizeIncreasing": lambda: posterize(image, posterize_increasing_level_to_arg(level)),
        "Solarize": lambda: solarize(image, solarize_level_to_arg(level)),
        "SolarizeIncreasing": lambda: solarize(image, solarize_increasing_level_to_arg(level)),
        "SolarizeAdd": lambda: solarize_add(image, solarize_add_level_to_arg(level)),
        "Color": lambda: color(image, enhance_level_to_arg(level)),
        "ColorIncreasing": lambda: color(image, enhance_increasing_level_to_arg(level, negate)),
        "Contrast": lambda: contrast(image, enhance_level_to_arg(level)),
        "ContrastIncreasing": lambda: contrast(
            image, enhance_increasing_level_to_arg(level, negate)
        ),
        "Brightness": lambda: brightness(image, enhance_level_to_arg(level)),
        "BrightnessIncreasing": lambda: brightness(
            image, enhance_increasing_level_to_arg(level, negate)
        ),
        "Sharpness": lambda: sharpness(image, enhance_level_to_arg(level)),
        "SharpnessIncreasing": lambda: sharpness(
            image, enhance_increasing_level_to_arg(level, negate)
        ),
    }
    if name not in ops:
        known = sorted([*ops, *_GEOMETRIC_OPS])
        raise ValueError(f"unknown RandAugment op {name!r}; known: {known}")
    return ops[name]()


def op_names(increasing=True):
    """The op list `rand_augment` chooses from, in dispatch order (``op_index`` refers to it)."""
    return RAND_INCREASING_OPS if increasing else RAND_OPS


@tf.autograph.experimental.do_not_convert
def apply_op(image, name, level, negate=False, *, fill=DEFAULT_FILL, translate_pct=0.45):
    """Applies timm op ``name`` (e.g. ``"ShearX"``) at magnitude ``level`` in [0, 10].

    ``negate`` is the ``_randomly_negate`` outcome for signed arguments (ignored by the others).
    """
    image = _check_image(image)
    level = _f64(level)
    negate = tf.convert_to_tensor(negate, tf.bool)
    if name in _GEOMETRIC_OPS:
        shape = tf.shape(image)
        matrix = _geometric_matrix(name, shape[0], shape[1], level, negate, translate_pct)
        return affine(image, matrix, fill)
    return _pixel_op(name, image, level, negate)


def sample_layers(seed, *, num_ops, num_layers=2, magnitude=9, magnitude_std=0.5, prob=0.5):
    """The per-image random choices of timm's RandAugment, from a stateless ``[2]`` seed.

    Returns a dict of ``[num_layers]`` tensors:
      * ``op_index`` int32, uniform over ``num_ops`` with replacement (``np.random.choice``),
      * ``apply`` bool, True with probability ``prob`` (timm skips when ``random() > prob``),
      * ``magnitude`` float64, ``gauss(magnitude, magnitude_std)`` clipped to [0, 10] (the plain
        ``magnitude`` clipped when ``magnitude_std == 0``),
      * ``negate`` bool, True with probability 0.5 (``_randomly_negate``; unsigned ops ignore it).
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    shape = [num_layers]
    op_index = tf.random.stateless_uniform(
        shape, seeds[0], minval=0, maxval=num_ops, dtype=tf.int32
    )
    apply = tf.random.stateless_uniform(shape, seeds[1], dtype=tf.float64) <= prob
    level = tf.fill(shape, tf.constant(float(magnitude), tf.float64))
    if magnitude_std > 0:
        noise = tf.random.stateless_normal(shape, seeds[2], dtype=tf.float64)
        level = level + magnitude_std * noise
    level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
    negate = tf.random.stateless_uniform(shape, seeds[3], dtype=tf.float64) > 0.5
    return dict(op_index=op_index, apply=apply, magnitude=level, negate=negate)


@tf.autograph.experimental.do_not_convert
def rand_augment(
    image,
    seed,
    *,
    num_layers=2,
    magnitude=9,
    magnitude_std=0.5,
    increasing=True,
    prob=0.5,
    fill=DEFAULT_FILL,
    translate_pct=0.45,
):
    """timm RandAugment ``'rand-m9-mstd0.5-inc1'`` (the MAE fine-tuning default) on one image.

    image: uint8 [H, W, 3] tensor (H, W >= 3); seed: int [2] tensor for stateless random ops.
    Returns uint8 [H, W, 3]. Defaults are the official ones (``fill`` = timm's ``img_mean`` for
    the ImageNet mean, bicubic geometry). `parse_rand_augment` turns other timm strings into
    ``num_layers / magnitude / magnitude_std / increasing``. Runs in graph mode (tf.data maps):
    the layers are a ``tf.while_loop`` around one ``tf.switch_case`` whose geometric branch is a
    single `affine` call, so tracing stays cheap.
    """
    image = _check_image(image)
    if magnitude_std < 0:
        raise ValueError(f"magnitude_std must be >= 0, got {magnitude_std}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    names = op_names(increasing)
    fill = tuple(fill)
    params = sample_layers(
        seed,
        num_ops=len(names),
        num_layers=num_layers,
        magnitude=magnitude,
        magnitude_std=magnitude_std,
        prob=prob,
    )
    geometric = [n for n in names if n in _GEOMETRIC_OPS]
    pixel = [n for n in names if n not in _GEOMETRIC_OPS]
    # op index -> branch: pixel ops get one branch each, all geometric ops share the last one.
    branch_of_op = tf.constant(
        [pixel.index(n) if n in pixel else len(pixel) for n in names], tf.int32
    )
    geometric_of_op = tf.constant(
        [geometric.index(n) if n in geometric else 0 for n in names], tf.int32
    )
    static_shape = image.shape

    def layer(i, im):
        op = params["op_index"][i]
        level, negate = params["magnitude"][i], params["negate"][i]

        def geometric_branch():
            shape = tf.shape(im)
            matrices = tf.stack(
                [
                    _geometric_matrix(n, shape[0], shape[1], level, negate, translate_pct)
                    for n in geometric
                ]
            )
            return affine(im, tf.gather(matrices, tf.gather(geometric_of_op, op)), fill)

        branches = [lambda n=n: _pixel_op(n, im, level, negate) for n in pixel]
        branches.append(geometric_branch)
        out = tf.cond(
            params["apply"][i],
            lambda: tf.switch_case(tf.gather(branch_of_op, op), branches),
            lambda: im,
        )
        out.set_shape(static_shape)
        return i + 1, out

    _, image = tf.while_loop(
        lambda i, im: i < num_layers,
        layer,
        (tf.constant(0), image),
        shape_invariants=(tf.TensorShape([]), static_shape),
    )
    image.set_shape(static_shape)
    return image
