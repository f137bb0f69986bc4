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

`train_transform` computes only what the crop keeps (label windows picked from the original
label, the image resized for the crop window only when that is cheaper), equal to the steps
run one after another on whole images; with device_photometric the photometric distortion (its
HSV round trips are most of the host's cost) is left to the accelerator
(`mae_jax.data.photometric`), equal too.
"""

import tensorflow as tf

from mae_jax.data import photometric as device_ops
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


def resize_image_window(image: tf.Tensor, size, top, left, height, width) -> tf.Tensor:
    """resize_image(image, size)[top:top+height, left:left+width], exactly, at less cost.

    When the resized image is much larger than the window, only the window is computed: TF's
    bilinear kernel, written out as two separable passes (lerp along rows of the source rows
    the window reads, then along columns), the same float operations in the same order.
    Otherwise TF's kernel (faster per pixel) resizes the whole image and only the window is
    rounded. Returns [height, width, 3] uint8.
    """
    def whole():
        resized = tf.image.resize(image, size, method="bilinear", antialias=False)
        # A bilinear blend of uint8 values stays in [0, 255]: rounding is all resize_image adds.
        return tf.round(resized[top : top + height, left : left + width])

    def window_only():
        shape = tf.shape(image)
        row_low, row_high, row_lerp = _bilinear_taps(top, height, shape[0], size[0])
        col_low, col_high, col_lerp = _bilinear_taps(left, width, shape[1], size[1])
        first = row_low[0]
        # Columns first, as TF's kernel blends (top_left, top_right) then (top, bottom); rows
        # gathered whole (a gather along axis 1 is several times slower).
        source = tf.transpose(image[first : row_high[-1] + 1], [1, 0, 2])  # [W, rows, 3]
        low = tf.cast(tf.gather(source, col_low), tf.float32)
        high = tf.cast(tf.gather(source, col_high), tf.float32)
        rows = tf.transpose(low + (high - low) * col_lerp[:, None, None], [1, 0, 2])
        low, high = tf.gather(rows, row_low - first), tf.gather(rows, row_high - first)
        return tf.round(low + (high - low) * row_lerp[:, None, None])

    area = tf.cast(size[0] * size[1], tf.float32)
    large = area > _WINDOW_ONLY_AREA * tf.cast(height * width, tf.float32)
    return tf.cast(tf.cond(large, window_only, whole), tf.uint8)


# window_only beats TF's whole-image kernel when the resized image is over ~2.5x the window
# (measured on 512 x 683 photos, 512 x 512 crops: 3.2-4.1 ms vs 1.3 ms at 1x, 8.1 ms at 4x).
_WINDOW_ONLY_AREA = 2.5


def _bilinear_taps(start, count, in_size, out_size):
    """TF's ResizeBilinear (half-pixel centres) source rows of output rows start ..
    start+count-1: (lower, upper, lerp), as its compute_interpolation_weights computes them."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    position = (tf.cast(start + tf.range(count), tf.float32) + 0.5) * scale - 0.5
    floor = tf.floor(position)
    lower = tf.maximum(tf.cast(floor, tf.int32), 0)
    upper = tf.minimum(tf.cast(tf.math.ceil(position), tf.int32), in_size - 1)
    return lower, upper, position - floor


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
    return _pick(label, _nearest_sources(shape[0], size[0]), _nearest_sources(shape[1], size[1]))


def _pick(label, rows, cols, transposed=False):
    """label[rows][:, cols] for [H, W] `label` and int32 index vectors; transposed=True gives
    its transpose (cheaper: one transpose fewer). Gathering whole rows twice, with a
    transpose between, is 2x faster than gathering single values along axis 1."""
    picked = tf.gather(tf.transpose(tf.gather(label, rows)), cols)
    return picked if transposed else tf.transpose(picked)


def random_rescale(image, label, *, seed, scale=(2048, 512), ratio_range=(0.5, 2.0)):
    """mmseg Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True).

    image: [H, W, 3] uint8; label: [H, W]. Returns the rescaled pair.
    """
    image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
    shape = tf.shape(image)
    size = random_rescale_size(shape[0], shape[1], seed=seed, scale=scale, ratio_range=ratio_range)
    return resize_image(image, size), resize_label(label, size)


def random_rescale_size(height, width, *, seed, scale=(2048, 512), ratio_range=(0.5, 2.0)):
    """The (new_height, new_width) `random_rescale` resizes an image of this size to."""
    ratio = tf.random.stateless_uniform([], seed, ratio_range[0], ratio_range[1], dtype=tf.float64)
    # mmseg: scale = int(scale[0] * ratio), int(scale[1] * ratio).
    target = (tf.floor(scale[0] * ratio), tf.floor(scale[1] * ratio))
    return rescale_size(height, width, target)


def category_ratio_ok(label_crop, *, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX):
    """mmseg's crop test: >1 class present and the largest covers < cat_max_ratio of the
    non-ignored pixels. label_crop: [h, w] integer. Returns a scalar bool."""
    return _counts_ok(_class_counts(label_crop, (ignore_index,)), cat_max_ratio)


def _class_counts(label, ignored) -> tf.Tensor:
    """Pixels per label value, the `ignored` values counted as 0: int32 [>= 256]."""
    counts = tf.math.bincount(tf.cast(tf.reshape(label, [-1]), tf.int32), minlength=256)
    values = tf.range(tf.shape(counts)[0])
    for value in ignored:
        counts = tf.where(values == value, 0, counts)
    return counts


def _counts_ok(counts, cat_max_ratio) -> tf.Tensor:
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
    image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
    shape = tf.shape(label)

    def window(top, left, height, width):
        return label[top : top + height, left : left + width]

    def accept(*box):
        return category_ratio_ok(window(*box), cat_max_ratio=cat_max_ratio,
                                 ignore_index=ignore_index)

    top, left, height, width = category_crop_box(
        shape[0], shape[1], accept, crop_size=crop_size, seed=seed, max_tries=max_tries,
        tries=cat_max_ratio < 1.0)
    return image[top : top + height, left : left + width], window(top, left, height, width)


def category_crop_box(height, width, accept, *, crop_size, seed, max_tries=10, tries=True):
    """The box `random_crop_with_category_ratio` keeps in a height x width label, as int32
    (top, left, crop height, crop width). accept(top, left, h, w): whether that window passes
    the category test, so a caller makes only the windows it tries. tries=False: the first
    window, untested."""
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    margin_h = tf.maximum(height - crop_h, 0)
    margin_w = tf.maximum(width - crop_w, 0)
    out_h = tf.minimum(height, crop_h)
    out_w = tf.minimum(width, crop_w)
    # All candidate offsets up front: attempt i uses row i whatever happened before.
    draws = tf.random.stateless_uniform([max_tries + 1, 2], seed, dtype=tf.float64)
    offsets_h = tf.cast(draws[:, 0] * tf.cast(margin_h + 1, tf.float64), tf.int32)
    offsets_w = tf.cast(draws[:, 1] * tf.cast(margin_w + 1, tf.float64), tf.int32)

    def keep_trying(i):
        return tf.logical_and(
            i < max_tries, tf.logical_not(accept(offsets_h[i], offsets_w[i], out_h, out_w)))

    def first_passing():
        (chosen,) = tf.while_loop(keep_trying, lambda i: (i + 1,), (tf.constant(0),))
        return chosen

    if not tries:
        return offsets_h[0], offsets_w[0], out_h, out_w
    # Without margins every window is the whole label: which try passes changes nothing.
    chosen = tf.cond((margin_h > 0) | (margin_w > 0), first_passing, lambda: tf.constant(0))
    return offsets_h[chosen], offsets_w[chosen], out_h, out_w


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
    # OpenCV's sector table: (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q).
    r = tf.where((sector == 0) | (sector == 5), v,
                 tf.where(sector == 1, q, tf.where(sector == 4, t, p)))
    g = tf.where((sector == 1) | (sector == 2), v,
                 tf.where(sector == 0, t, tf.where(sector == 3, q, p)))
    b = tf.where((sector == 3) | (sector == 4), v,
                 tf.where(sector == 2, t, tf.where(sector == 5, q, p)))
    rgb = tf.stack([r, g, b], axis=-1) * 255.0
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
    device_photometric=False,
):
    """The full mmseg ADE20K train pipeline on one example.

    image: [H, W, 3] uint8 RGB; label: [H, W] or [H, W, 1] uint8 RAW annotation (0 = other).
    seed: [2] int. Returns image uint8 [crop, crop, 3] (padded with the mean colour; normalise
    on device) and label uint8 [crop, crop] (reduced, padded with 255).
    device_photometric=True (with photometric): the distortion is left to the accelerator
    (`mae_jax.data.photometric.apply_photometric`) and a third value is returned, its
    parameters, float32 [9] (the same draws, then the crop's height and width before padding).
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    image, label = _as_example(image, label)
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    # random_rescale, then random_crop_with_category_ratio, computing only what the crop keeps:
    # the label's nearest-neighbour resize picks source pixels, so each tried window is picked
    # straight from the original label; the image is resized whole (TF's bilinear kernel is
    # faster than any gather), but rounded to uint8 only inside the crop.
    shape = tf.shape(label)
    size = random_rescale_size(shape[0], shape[1], seed=seeds[0], scale=scale,
                               ratio_range=ratio_range)
    rows = _nearest_sources(shape[0], size[0])
    cols = _nearest_sources(shape[1], size[1])

    def window(top, left, height, width, transposed=False):  # raw labels
        return _pick(label, rows[top : top + height], cols[left : left + width], transposed)

    def accept(*box):  # counted on raw labels (0 and 255 ignored), in any orientation
        counts = _class_counts(window(*box, transposed=True), (0, IGNORE_INDEX))
        return _counts_ok(counts, cat_max_ratio)

    top, left, height, width = category_crop_box(
        size[0], size[1], accept, crop_size=(crop_h, crop_w), seed=seeds[1],
        tries=cat_max_ratio < 1.0)
    label = reduce_zero_label(window(top, left, height, width))
    image = resize_image_window(image, size, top, left, height, width)
    if flip:  # tf.reverse: a negative-stride slice copies byte by byte (10x slower here)
        flipped = tf.random.stateless_uniform([], seeds[2]) < 0.5
        image = tf.cond(flipped, lambda: tf.reverse(image, [1]), lambda: image)
        label = tf.cond(flipped, lambda: tf.reverse(label, [1]), lambda: label)
    if photometric and device_photometric:
        crop = tf.cast(tf.shape(label)[:2], tf.float32)
        params = tf.concat([photometric_params(seeds[3]), crop], axis=0)
    elif photometric:
        image = photometric_distortion(image, seed=seeds[3])
    # Pad at the bottom / right, as mmcv.impad does, with the mean colour: blocks of it
    # concatenated (5x faster than a tf.pad per channel).
    pad_h = crop_h - tf.shape(label)[0]
    pad_w = crop_w - tf.shape(label)[1]
    mean = tf.constant(IMAGENET_MEAN_UINT8, tf.uint8)
    image = tf.concat([image, tf.broadcast_to(mean, tf.stack([height, pad_w, 3]))], axis=1)
    image = tf.concat([image, tf.broadcast_to(mean, tf.stack([pad_h, crop_w, 3]))], axis=0)
    label = tf.pad(tf.cast(label, tf.uint8), [[0, pad_h], [0, pad_w]],
                   constant_values=IGNORE_INDEX)
    image = tf.ensure_shape(image, [crop_h, crop_w, 3])
    label = tf.ensure_shape(label, [crop_h, crop_w])
    if photometric and device_photometric:
        return image, label, tf.ensure_shape(params, [device_ops.NUM_PARAMS])
    return image, label


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
