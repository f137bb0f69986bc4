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

from mae_jax.data import image_ops
from mae_jax.data import photometric as device_ops
from mae_jax.data.constants import IMAGENET_MEAN_UINT8
from mae_jax.data.seg_photometric import (  # noqa: F401 - the distortion: part of this API
    adjust_hue,
    adjust_saturation,
    hsv_to_rgb_uint8,
    photometric_distortion,
    photometric_params,
    rgb_to_hsv_uint8,
)
from mae_jax.data.seg_resize import (  # noqa: F401 - resize_image: part of this API
    nearest_sources,
    pick,
    resize_image,
    resize_image_window,
    resize_label,
)

IGNORE_INDEX = 255


def reduce_zero_label(label: tf.Tensor) -> tf.Tensor:
    """mmseg's reduce_zero_label: raw 0 ("other") -> 255, class c -> c - 1, 255 stays 255.

    label: [H, W] or [H, W, 1] uint8 raw annotation. Returns the same shape and dtype.
    """
    label = tf.convert_to_tensor(label)
    ignored = tf.logical_or(tf.equal(label, 0), tf.equal(label, IGNORE_INDEX))
    return tf.where(ignored, tf.constant(IGNORE_INDEX, label.dtype), label - 1)


def _as_example(image, label, encoded_ok=False) -> tuple[tf.Tensor, tf.Tensor]:
    """Tensors with image [H, W, 3] uint8 (or, encoded_ok, its bytes) and label [H, W] (a
    trailing 1-channel axis dropped)."""
    image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
    if image.dtype != tf.uint8 and not (encoded_ok and image.dtype == tf.string):
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

    image: [H, W, 3] uint8 RGB, or its encoded bytes (a JPEG is then decoded only where the
    crop reads it); label: [H, W] or [H, W, 1] uint8 RAW annotation (0 = other).
    seed: [2] int. Returns image uint8 [crop, crop, 3] (padded with the mean colour; normalise
    on device) and label uint8 [crop, crop] (reduced, padded with 255).
    device_photometric=True (with photometric): the distortion is left to the accelerator
    (`mae_jax.data.photometric.apply_photometric`) and a third value is returned, its
    parameters, float32 [9] (the same draws, then the crop's height and width before padding).
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    image, label = _as_example(image, label, encoded_ok=True)
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    image_size = image_ops.image_shape(image) if image.dtype == tf.string else tf.shape(image)[:2]
    # A pair of different sizes is broken data (mmseg would crop them apart): an error, which
    # the input pipeline turns into an ignored slot.
    tf.debugging.assert_equal(image_size, tf.shape(label)[:2],
                              message="the image and its label differ in size")
    # random_rescale, then random_crop_with_category_ratio, computing only what the crop keeps:
    # the label's nearest-neighbour resize picks source pixels, so each tried window is picked
    # straight from the original label; the image is resized for the crop window
    # (`resize_image_window`).
    shape = tf.shape(label)
    size = random_rescale_size(shape[0], shape[1], seed=seeds[0], scale=scale,
                               ratio_range=ratio_range)
    rows = nearest_sources(shape[0], size[0])
    cols = nearest_sources(shape[1], size[1])

    def window(top, left, height, width, transposed=False):  # raw labels
        return pick(label, rows[top : top + height], cols[left : left + width], transposed)

    def accept(*box):  # counted on raw labels (0 and 255 ignored), in any orientation
        counts = _class_counts(window(*box, transposed=True), (0, IGNORE_INDEX))
        return _counts_ok(counts, cat_max_ratio)

    top, left, height, width = category_crop_box(
        size[0], size[1], accept, crop_size=(crop_h, crop_w), seed=seeds[1],
        tries=cat_max_ratio < 1.0)
    label = reduce_zero_label(window(top, left, height, width))
    image = resize_image_window(image, size, top, left, height, width, image_shape=image_size)
    if flip:  # tf.reverse: a negative-stride slice copies byte by byte (10x slower here)
        flipped = tf.random.stateless_uniform([], seeds[2]) < 0.5
        image = tf.cond(flipped, lambda: tf.reverse(image, [1]), lambda: image)
        label = tf.cond(flipped, lambda: tf.reverse(label, [1]), lambda: label)
    if photometric and device_photometric:
        crop = tf.cast(tf.stack([height, width]), tf.float32)
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
