"""Sliding-window inference as mmseg's `EncoderDecoder.slide_inference` (ADE20K test protocol).

Windows of `window` x `window` pixels step by `stride` over the (already test-scale resized,
normalised) image; the last row / column of windows is shifted back to end at the border, so
windows overlap more there. Window logits are summed into the image and divided by how many
windows covered each pixel, then resized (bilinear, align_corners False) to the original size.

Fixed window shape: every window is fed at `window` x `window` (a crop smaller than the window,
i.e. an image smaller than the window in some dimension, is zero-padded at the bottom / right
and the logits of the padding are dropped). mmseg instead runs such a crop at its own size; the
padding keeps the backbone's shape fixed.

Two implementations of the same arithmetic:
- `slide_inference`: one image, eager jnp ops whose shapes follow the image (readable; each
  new image size compiles new programs). The reference the canvas path is tested against.
- `stitch_windows` + `resize_tile`: the jit-able kernels of the evaluation (`evaluation.py`),
  on fixed canvases laid out by `canvas.py`: window offsets and sizes are traced values, so one
  compiled program serves every image size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.data.constants import normalize_uint8
from mae_jax.models.resize import resize_bilinear


def window_boxes(height: int, width: int, *, window: int, stride: int) -> list[tuple[int, ...]]:
    """(y1, y2, x1, x2) of every window over a [height, width] image, rows outer (mmseg's order).

    Grid: max(size - window + stride - 1, 0) // stride + 1 windows per axis, each clamped to end
    inside the image; a window larger than the image covers all of it (y2 - y1 < window).
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    boxes = []
    for row in range(max(height - window + stride - 1, 0) // stride + 1):
        for col in range(max(width - window + stride - 1, 0) // stride + 1):
            y2, x2 = min(row * stride + window, height), min(col * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def num_windows(height: int, width: int, *, window: int = 512, stride: int = 341) -> int:
    """How many windows `slide_inference` runs on a [height, width] image."""
    return len(window_boxes(height, width, window=window, stride=stride))


def slide_inference(
    logits_fn: Callable[[jax.Array], jax.Array],
    image: jax.Array,
    *,
    num_classes: int,
    window: int = 512,
    stride: int = 341,
    output_size: tuple[int, int] | None = None,
    pad_windows_to: int | None = None,
) -> jax.Array:
    """image: [h, w, 3] or [1, h, w, 3] at test scale -> logits [H, W, num_classes] (float32)
    at `output_size` (the original image size; None keeps [h, w]).

    logits_fn: windows [n, window, window, 3] -> logits [n, window, window, num_classes]. Logits
    at a lower resolution (e.g. UPerNet's 1/4) are first resized to the window, as mmseg's
    `encode_decode` does. All windows of the image go through one call.
    """
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(
            f"slide_inference takes one image [h, w, C] or [1, h, w, C], got {image.shape}"
        )
    height, width = image.shape[:2]
    boxes = window_boxes(height, width, window=window, stride=stride)
    count = len(boxes) if pad_windows_to is None else pad_windows_to
    if count < len(boxes):
        raise ValueError(
            f"a {height}x{width} image needs {len(boxes)} windows but pad_windows_to is "
            f"{pad_windows_to}; raise it to at least num_windows(max height, max width)"
        )
    image = jnp.asarray(image)
    crops = [_pad_to(image[y1:y2, x1:x2], window) for y1, y2, x1, x2 in boxes]
    crops += [jnp.zeros_like(crops[0])] * (count - len(boxes))
    logits = logits_fn(jnp.stack(crops))
    if logits.ndim != 4 or logits.shape[0] != count or logits.shape[-1] != num_classes:
        raise ValueError(
            f"logits_fn returned {logits.shape}; expected [{count}, h, w, {num_classes}]"
        )
    if logits.shape[1:3] != (window, window):
        logits = resize_bilinear(logits, (window, window))
    logits = logits.astype(jnp.float32)

    summed = jnp.zeros((height, width, num_classes), jnp.float32)
    coverage = np.zeros((height, width, 1), np.float32)
    for k, (y1, y2, x1, x2) in enumerate(boxes):
        summed = summed.at[y1:y2, x1:x2].add(logits[k, : y2 - y1, : x2 - x1])
        coverage[y1:y2, x1:x2] += 1
    averaged = summed / jnp.asarray(coverage)
    if output_size is None or tuple(output_size) == (height, width):
        return averaged
    return resize_bilinear(averaged, tuple(output_size))


def _pad_to(crop: jax.Array, window: int) -> jax.Array:
    pad_h, pad_w = window - crop.shape[0], window - crop.shape[1]
    if pad_h == 0 and pad_w == 0:
        return crop
    return jnp.pad(crop, ((0, pad_h), (0, pad_w), (0, 0)))


# --------------------------------------------------------------------------- Fixed canvases
def stitch_windows(
    logits_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    sizes: jax.Array,
    transposed: jax.Array,
    window_slot: jax.Array,
    window_offset: jax.Array,
    window_valid: jax.Array,
    *,
    window: int,
    num_classes: int,
) -> jax.Array:
    """The windows of several images, on fixed landscape canvases -> their averaged logits.

    images: [B, Hc, Wc, 3] float32 (normalised) or uint8 (normalised here), each image at the
    top left of its canvas in landscape orientation (`canvas.place`); sizes: [B, 2] int32 its
    (h, w), pixels outside are zeroed after normalisation (the padding `slide_inference` adds);
    transposed: [B] bool (portrait images, stored transposed); window_slot: [N] int32,
    window_offset: [N, 2] int32 (canvas top, left), window_valid: [N] bool (False: unused slot,
    adds nothing). logits_fn: [N, window, window, 3] -> [N, s, s, num_classes] (any s; resized
    to the window as mmseg's `encode_decode`). Returns [B, Hc, Wc, num_classes] float32: summed
    window logits / windows covering the pixel, meaningful inside each image only.
    """
    count, (slots, canvas_h, canvas_w) = window_slot.shape[0], images.shape[:3]
    canvases = _model_input(images, sizes)
    crops = jax.vmap(
        lambda slot, offset: jax.lax.dynamic_slice(
            canvases[slot], (offset[0], offset[1], 0), (window, window, 3)
        )
    )(window_slot, window_offset)
    flip = transposed[window_slot]
    # The model sees every window in its original orientation.
    crops = jnp.where(flip[:, None, None, None], crops.transpose(0, 2, 1, 3), crops)
    logits = logits_fn(crops)
    if logits.ndim != 4 or logits.shape[0] != count or logits.shape[-1] != num_classes:
        raise ValueError(
            f"logits_fn returned {logits.shape}; expected [{count}, h, w, {num_classes}]"
        )

    def add_window(k, carry):
        summed, coverage = carry
        window_logits = logits[k]
        if window_logits.shape[:2] != (window, window):  # static: UPerNet's 1/4 logits
            window_logits = resize_bilinear(window_logits, (window, window))
        window_logits = window_logits.astype(jnp.float32)
        window_logits = jnp.where(flip[k], window_logits.transpose(1, 0, 2), window_logits)
        start = (window_slot[k], window_offset[k, 0], window_offset[k, 1], 0)

        def accumulate(target, value):  # target[slot, top:top + window, left:left + window] +=
            block = jax.lax.dynamic_slice(target, start, (1, window, window, target.shape[-1]))
            block = block + jnp.where(window_valid[k], value, 0.0)[None]
            return jax.lax.dynamic_update_slice(target, block, start)

        return accumulate(summed, window_logits), accumulate(coverage, jnp.ones((1, 1, 1)))

    # Windows are added one after another in mmseg's order: deterministic sums, one window of
    # resized logits alive at a time.
    summed = jnp.zeros((slots, canvas_h, canvas_w, num_classes), jnp.float32)
    coverage = jnp.zeros((slots, canvas_h, canvas_w, 1), jnp.float32)
    summed, coverage = jax.lax.fori_loop(0, count, add_window, (summed, coverage))
    return summed / jnp.maximum(coverage, 1.0)


def resize_tile(
    canvases: jax.Array,
    slot: jax.Array,
    row_index: jax.Array,
    row_weight: jax.Array,
    col_index: jax.Array,
    col_weight: jax.Array,
) -> jax.Array:
    """One tile of the bilinear resize (align_corners False) of canvases[slot] to a label size.

    canvases: [B, Hc, Wc, C]; slot: [] int32; row_index / col_index: [2, t] int32 low and high
    source row / column of each output row / column, row_weight / col_weight: [2, t] float32
    their weights (`canvas.resampling_table`). Returns [t, t, C]: rows are interpolated first,
    then columns, as `resize_bilinear`'s two matrix products.
    """

    def corner(rows, cols):  # [t, t, C]: canvases[slot, rows[i], cols[j]]
        return canvases[slot, rows[:, None], cols[None, :]]

    (row_low, row_high), (col_low, col_high) = row_index, col_index
    row_weights = row_weight[:, :, None, None]  # [2, t, 1, 1]
    left = corner(row_low, col_low) * row_weights[0] + corner(row_high, col_low) * row_weights[1]
    right = corner(row_low, col_high) * row_weights[0] + corner(row_high, col_high) * row_weights[1]
    col_weights = col_weight[:, None, :, None]  # [2, 1, t, 1]
    return left * col_weights[0] + right * col_weights[1]


def _model_input(images: jax.Array, sizes: jax.Array) -> jax.Array:
    """[B, H, W, 3] uint8 or float -> float32 normalised, 0 outside each image's [h, w]."""
    if images.dtype == jnp.uint8:
        images = normalize_uint8(images)
    rows = jnp.arange(images.shape[1])[None, :, None] < sizes[:, 0, None, None]
    cols = jnp.arange(images.shape[2])[None, None, :] < sizes[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], images.astype(jnp.float32), 0.0)
