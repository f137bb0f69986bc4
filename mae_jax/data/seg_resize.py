"""Resizes of mmseg's ADE20K pipelines as TensorFlow ops: the image's bilinear (whole, or a
window of it computed alone) and the label's nearest neighbour (exactly cv2.INTER_NEAREST).
Used by `mae_jax.data.seg_transforms`.
"""

import tensorflow as tf

from mae_jax.data import image_ops


def resize_image(image: tf.Tensor, size) -> tf.Tensor:
    """Bilinear resize (half-pixel centres, no antialias, as cv2.INTER_LINEAR), back to uint8.

    image: [H, W, 3] uint8. size: (h, w). Returns [h, w, 3] uint8. Computed in float32 and
    rounded half to even, where cv2 uses 11-bit fixed point: up to 1 level apart on ~12% of
    pixels (data review).
    """
    resized = tf.image.resize(image, size, method="bilinear", antialias=False)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def resize_image_window(image: tf.Tensor, size, top, left, height, width,
                        image_shape=None) -> tf.Tensor:
    """resize_image(image, size)[top:top+height, left:left+width], exactly, at less cost.

    image: [H, W, 3] uint8, or its encoded bytes (a string scalar: then a JPEG is decoded only
    where the window reads it); image_shape: its (H, W) when the caller has it already. When
    the resized image is much larger than the window, only the window is computed: TF's
    bilinear kernel, written out as two separable passes (lerp along rows of the source rows
    the window reads, then along columns), the same float operations in the same order.
    Otherwise TF's kernel (faster per pixel) resizes the whole image and only the window is
    rounded. Returns [height, width, 3] uint8.
    """
    encoded = image.dtype == tf.string
    if image_shape is not None:
        shape = image_shape
    else:
        shape = image_ops.image_shape(image) if encoded else tf.shape(image)[:2]

    def whole():
        pixels = image_ops.decode_rgb(image) if encoded else image
        resized = tf.image.resize(pixels, size, method="bilinear", antialias=False)
        # A bilinear blend of uint8 values stays in [0, 255]: rounding is all resize_image adds.
        return tf.round(resized[top : top + height, left : left + width])

    def window_only():
        row_low, row_high, row_lerp = _bilinear_taps(top, height, shape[0], size[0])
        col_low, col_high, col_lerp = _bilinear_taps(left, width, shape[1], size[1])
        first, last = row_low[0], row_high[-1]
        if encoded:
            pixels, start = image_ops.decode_window(image, first, col_low[0], last + 1 - first,
                                                    col_high[-1] + 1 - col_low[0])
            start = col_low[0] - start  # the absolute column at pixels[:, 0]
        else:
            pixels, start = image[first : last + 1], 0
        # Columns first, as TF's kernel blends (top_left, top_right) then (top, bottom); rows
        # gathered whole (a gather along axis 1 is several times slower).
        source = tf.transpose(pixels, [1, 0, 2])  # [columns, rows, 3]
        low = tf.cast(tf.gather(source, col_low - start), tf.float32)
        high = tf.cast(tf.gather(source, col_high - start), tf.float32)
        rows = tf.transpose(low + (high - low) * col_lerp[:, None, None], [1, 0, 2])
        low, high = tf.gather(rows, row_low - first), tf.gather(rows, row_high - first)
        return tf.round(low + (high - low) * row_lerp[:, None, None])

    area = tf.cast(size[0] * size[1], tf.float32)
    large = area > WINDOW_ONLY_AREA * tf.cast(height * width, tf.float32)
    return tf.cast(tf.cond(large, window_only, whole), tf.uint8)


# window_only beats TF's whole-image kernel when the resized image is over ~2.5x the window
# (measured on 512 x 683 photos, 512 x 512 crops: 3.2-4.1 ms vs 1.3 ms at 1x, 8.1 ms at 4x).
WINDOW_ONLY_AREA = 2.5


def _bilinear_taps(start, count, in_size, out_size):
    """TF's ResizeBilinear (half-pixel centres) source rows of output rows start ..
    start+count-1: (lower, upper, lerp), as its compute_interpolation_weights computes them."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    position = (tf.cast(start + tf.range(count), tf.float32) + 0.5) * scale - 0.5
    floor = tf.floor(position)
    lower = tf.maximum(tf.cast(floor, tf.int32), 0)
    upper = tf.minimum(tf.cast(tf.math.ceil(position), tf.int32), in_size - 1)
    return lower, upper, position - floor


def nearest_sources(in_size, out_size) -> tf.Tensor:
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
    return pick(label, nearest_sources(shape[0], size[0]), nearest_sources(shape[1], size[1]))


def pick(label, rows, cols, transposed=False):
    """label[rows][:, cols] for [H, W] `label` and int32 index vectors; transposed=True gives
    its transpose (cheaper: one transpose fewer). Gathering whole rows twice, with a
    transpose between, is 2x faster than gathering single values along axis 1."""
    picked = tf.gather(tf.transpose(tf.gather(label, rows)), cols)
    return picked if transposed else tf.transpose(picked)
