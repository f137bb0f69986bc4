"""Per-image TensorFlow ops of the image pipelines: decode, crop, one bicubic resize.

Graph ops only (they run inside tf.data maps, never calling back into Python); randomness comes
from stateless ops keyed by a [2] integer seed. They reproduce what torchvision does on PIL
images in the official recipes:

  * train: RandomResizedCrop(size, scale, ratio (3/4, 4/3), bicubic) + RandomHorizontalFlip;
  * eval: Resize(int(size / resize_ratio), bicubic) (shorter side) + CenterCrop(size).

JPEGs are decoded with libjpeg's accurate integer DCT (``INTEGER_ACCURATE``, JDCT_ISLOW), the one
PIL uses: the decoded pixels equal PIL's exactly (TF's default, INTEGER_FAST, is off by up to 4).
For the random crop only the crop window is decoded (``decode_and_crop_jpeg``, which honours
the DCT method), and the crop is resized once, straight to the output size.
"""

import math

import tensorflow as tf

JPEG_DCT = "INTEGER_ACCURATE"
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10  # torchvision's number of attempts before the center-crop fallback
# libjpeg-turbo's cropped decode upsamples chroma differently in the first / last column of the
# window; decoding this many more columns on each side (then dropping them) gives exactly the
# full decode's pixels.
_JPEG_EDGE = 2
# Output rows per matrix product in the resize: small blocks spend few multiplies on zero taps.
_BLOCK = 8


def crop_box(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, scale=(0.2, 1.0),
             clipped: bool = False):
    """torchvision RandomResizedCrop.get_params, with all tries drawn at once (stateless);
    clipped=True: MAE's util/crop.py (its linear probe's): the first try, its width and height
    clipped to the image's (`mae_jax.classification.config.CROP_STYLES`).

    Returns (top, left, crop_height, crop_width) as int32 scalars.
    """
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    area = h * w * tf.random.stateless_uniform([CROP_TRIES], seeds[0], scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform(
        [CROP_TRIES], seeds[1], math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    )
    aspect = tf.exp(log_ratio)
    # tf.round and Python's round both round half to even.
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    if clipped:  # then every try fits and the first is taken
        crop_w, crop_h = tf.clip_by_value(crop_w, 1.0, w), tf.clip_by_value(crop_h, 1.0, h)
    valid = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    # torch.randint(0, h - crop_h + 1) as a floor of a uniform draw.
    top = tf.floor(tf.random.stateless_uniform([CROP_TRIES], seeds[2]) * (h - crop_h + 1))
    left = tf.floor(tf.random.stateless_uniform([CROP_TRIES], seeds[3]) * (w - crop_w + 1))
    first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)

    # Fallback when no try fits: central crop with the aspect ratio clamped to CROP_RATIO.
    in_ratio = w / h
    fallback_w = tf.where(in_ratio > CROP_RATIO[1], tf.round(h * CROP_RATIO[1]), w)
    fallback_h = tf.where(in_ratio < CROP_RATIO[0], tf.round(w / CROP_RATIO[0]), h)
    fallback = tf.stack([(h - fallback_h) // 2, (w - fallback_w) // 2, fallback_h, fallback_w])
    chosen = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])
    box = tf.where(tf.reduce_any(valid), chosen, fallback)
    return tuple(tf.unstack(tf.cast(box, tf.int32)))


# -------------------------------------------------------------------- Decoding


def _decode_other(encoded: tf.Tensor) -> tf.Tensor:
    """PNG / GIF / BMP bytes -> [H, W, 3] uint8; grayscale is replicated, alpha dropped."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Image bytes -> the whole image, [H, W, 3] uint8 (JPEG with the accurate DCT)."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=JPEG_DCT),
        lambda: _decode_other(encoded),
    )


def decode_random_crop(encoded: tf.Tensor, seed: tf.Tensor, scale=(0.2, 1.0),
                       clipped: bool = False):
    """Image bytes -> (pixels, left, width): a RandomResizedCrop window (before resizing) is
    columns left .. left+width-1 of pixels, [h, W, 3] uint8.

    JPEG: the box comes from the header's size and only its window is decoded (with up to
    _JPEG_EDGE more columns each side, which the resize skips without a copy). Other formats
    are decoded whole, then sliced.
    """
    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        top, left, height, width = crop_box(seed, shape[0], shape[1], scale, clipped)
        wide, before = _decode_jpeg_window(encoded, shape, top, left, height, width)
        return wide, before, width

    def other():
        image = _decode_other(encoded)
        shape = tf.shape(image)
        top, left, height, width = crop_box(seed, shape[0], shape[1], scale, clipped)
        return image[top:top + height], left, width

    pixels, left, width = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    pixels.set_shape([None, None, 3])
    return pixels, left, width


def _decode_jpeg_window(encoded, shape, top, left, height, width):
    """Rows top .. top+height-1 of JPEG bytes (header size `shape`), columns left-before ..
    left+width-1+after with up to _JPEG_EDGE more columns each side, decoded alone; returns
    (pixels, before): pixels[:, before:before+width] equals the whole decode's window."""
    before = tf.minimum(left, _JPEG_EDGE)
    after = tf.minimum(shape[1] - left - width, _JPEG_EDGE)
    window = tf.stack([top, left - before, height, width + before + after])
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method=JPEG_DCT), before


def decode_window(encoded: tf.Tensor, top, left, height, width):
    """Image bytes -> (pixels [height, w, 3] uint8, first): pixels[:, first:first+width] are
    rows top.. and columns left.. of the whole image. JPEG: only that window is decoded
    (`_decode_jpeg_window`); other formats are decoded whole and their rows sliced."""
    def jpeg():
        return _decode_jpeg_window(encoded, tf.image.extract_jpeg_shape(encoded), top, left,
                                   height, width)

    def other():
        return _decode_other(encoded)[top:top + height], left

    pixels, first = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    pixels.set_shape([None, None, 3])
    return pixels, first


def image_shape(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) of image bytes, int32 [2]: a JPEG's from its header (nothing decoded)."""
    return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                   lambda: tf.shape(_decode_other(encoded))[:2])


# ---------------------------------------------------------------------- Resize


def _cubic(x: tf.Tensor) -> tf.Tensor:
    """Keys' cubic kernel with a = -0.5: PIL's (and TF's) bicubic filter."""
    x = tf.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, 0.0))


def _resample_rows(rows: tf.Tensor, out_size, start, count, first=0, in_size=None) -> tf.Tensor:
    """Rows start .. start+count-1 of the PIL-bicubic resize of rows first .. first+in_size-1
    of `rows` (default: all) to out_size rows.

    rows: [N, C] uint8 or float -> [count, C] float32. PIL's coefficients (its
    `precompute_coeffs`): when shrinking, the kernel widens by the scale (antialiasing); taps
    outside the image are dropped and the rest renormalised. Each block of _BLOCK output rows
    reads one window of input rows through one small matrix product, so the work is about
    taps x outputs, not in_size x outputs.
    """
    if in_size is None:
        in_size = tf.shape(rows)[0]
    in_f = tf.cast(in_size, tf.float32)
    scale = in_f / tf.cast(out_size, tf.float32)
    kernel_scale = tf.maximum(scale, 1.0)
    support = 2.0 * kernel_scale
    blocks = (count + _BLOCK - 1) // _BLOCK
    centers = (tf.cast(start + tf.range(blocks * _BLOCK), tf.float32) + 0.5) * scale
    # A window holds every tap of its block: from the first row's first tap to the last row's
    # last one (PIL's taps are [int(center - support + 0.5), int(center + support + 0.5))).
    window = tf.minimum(
        tf.cast(tf.floor((_BLOCK - 1) * scale + 2.0 * support), tf.int32) + 3, in_size
    )
    first_taps = tf.cast(tf.floor(centers[::_BLOCK] - support + 0.5), tf.int32)
    block_first = tf.minimum(tf.maximum(first_taps, 0), in_size - window)
    positions = tf.cast(
        tf.repeat(block_first, _BLOCK)[:, None] + tf.range(window)[None, :], tf.float32
    )
    # The kernel is 0 beyond PIL's tap range, so only the image border needs masking.
    weights = _cubic((positions - centers[:, None] + 0.5) / kernel_scale)
    weights = tf.where(positions < in_f, weights, 0.0)
    weights /= tf.reduce_sum(weights, axis=1, keepdims=True)
    inputs = tf.gather(rows, first + block_first[:, None] + tf.range(window)[None, :])
    out = tf.linalg.matmul(tf.reshape(weights, [blocks, _BLOCK, window]),
                           tf.cast(inputs, tf.float32))
    return tf.reshape(out, [blocks * _BLOCK, -1])[:count]


def _pil_clip8(x: tf.Tensor) -> tf.Tensor:
    """PIL's clip8 after each pass: round half up, saturate to [0, 255] -> uint8.

    floor(x + 0.5) clipped, written as a saturating cast (clip, then truncate, which is floor
    on [0, 255]): the same values as the float formula, and the next pass's gather, the
    transpose between the passes and the result move 1 byte a value instead of 4.
    """
    return tf.saturate_cast(x + 0.5, tf.uint8)


def resize_bicubic(image: tf.Tensor, size, window=None, columns=None) -> tf.Tensor:
    """PIL's bicubic `Image.resize(size)` (antialiased when shrinking), in float32.

    image: [H, W, 3] uint8 or float. size: (height, width) of the resized image. window:
    (top, left, height, width) of the resized image to compute (a center crop costs only its
    own pixels); default all of it. columns: (left, width), resize only these columns of
    `image` (no copy); default all. Returns [height, width, 3] uint8.
    As PIL does: the horizontal pass first, rounded and saturated to uint8 values (bicubic
    overshoot clipped there, which moves enlarged sharp edges by up to ~15 levels against a
    float path), then the vertical pass, rounded and saturated again.
    """
    top, left, height, width = window if window is not None else (0, 0, size[0], size[1])
    shape = tf.shape(image)
    first, in_width = columns if columns is not None else (0, shape[1])
    x = tf.transpose(image, [1, 0, 2])
    x = _pil_clip8(_resample_rows(tf.reshape(x, [shape[1], -1]), size[1], left, width, first,
                                  in_width))
    x = tf.transpose(tf.reshape(x, [width, shape[0], 3]), [1, 0, 2])
    x = _pil_clip8(_resample_rows(tf.reshape(x, [shape[0], -1]), size[0], top, height))
    return tf.reshape(x, [height, width, 3])


# ------------------------------------------------------------------ Transforms


def random_resized_crop(encoded: tf.Tensor, seed: tf.Tensor, image_size: int,
                        scale=(0.2, 1.0), clipped: bool = False) -> tf.Tensor:
    """RandomResizedCrop(image_size, scale, bicubic) + horizontal flip (p 0.5) of image bytes.

    Returns [image_size, image_size, 3] uint8.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    pixels, left, width = decode_random_crop(encoded, crop_seed, scale, clipped)
    image = resize_bicubic(pixels, (image_size, image_size), columns=(left, width))
    # Flipping after the resize equals flipping before: the kernel is symmetric. (tf.reverse:
    # a negative-stride slice copies byte by byte, ~1 ms a 224 px image.)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def random_crop_window(encoded: tf.Tensor, seed: tf.Tensor, image_size: int, canvas: int,
                       scale=(0.2, 1.0), clipped: bool = False) -> dict[str, tf.Tensor]:
    """`random_resized_crop` with the resize and flip left to the accelerator.

    Decodes the same crop window (same seed, same box): {"canvas": uint8 [h, w, 3] with h, w
    <= canvas (padded into the canvas's top-left corner when batched: `padded_batch` writes it
    there in one copy, a tf.pad first would cost ~0.5 ms more an image), "box": int32 [4] (top,
    left, height, width) of the crop in it, "flip": bool}. `mae_jax.data.pil_resample.resized_crop`
    of the padded canvases gives `random_resized_crop`'s images (equal in our tests: both sum
    the same products). A window larger than the canvas is resized here instead (box = the
    whole image_size square, which the device resize leaves unchanged), so no crop is cut.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    pixels, left, width = decode_random_crop(encoded, crop_seed, scale, clipped)
    shape = tf.shape(pixels)

    def resized_here():
        image = resize_bicubic(pixels, (image_size, image_size), columns=(left, width))
        return image, tf.constant([0, 0, image_size, image_size], tf.int32)

    fits = (shape[0] <= canvas) & (shape[1] <= canvas)
    window, box = tf.cond(fits, lambda: (pixels, tf.stack([0, left, shape[0], width])),
                          resized_here)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return {"canvas": window, "box": box, "flip": flip}


def resize_center_crop(encoded: tf.Tensor, image_size: int, resize_ratio: float = 224 / 256):
    """Resize(int(image_size / resize_ratio), bicubic) + CenterCrop(image_size) of image bytes.

    torchvision's Resize(s) makes the shorter side s and the longer int(s * long / short); the
    center crop starts at round((side - image_size) / 2). Only the cropped pixels are computed.
    Returns [image_size, image_size, 3] uint8.
    """
    resized_short = int(image_size / resize_ratio)
    if resized_short < image_size:
        raise ValueError(f"resize_ratio {resize_ratio} must be <= 1 (it gives a resized side "
                         f"{resized_short} < image_size {image_size})")
    image = decode_rgb(encoded)
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    short_side = tf.reduce_min(shape)
    new = tf.where(shape == short_side, tf.constant(resized_short, tf.float64),
                   tf.floor(resized_short * shape / short_side))
    new = tf.cast(new, tf.int32)
    top, left = tf.unstack(tf.cast(tf.round(tf.cast(new - image_size, tf.float64) / 2), tf.int32))
    crop = resize_bicubic(image, tf.unstack(new), (top, left, image_size, image_size))
    return tf.ensure_shape(crop, [image_size, image_size, 3])
