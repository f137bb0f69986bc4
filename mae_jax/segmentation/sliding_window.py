"""Sliding-window inference as mmseg's `EncoderDecoder.slide_inference` (ADE20K test protocol).

Windows of `window` x `window` pixels step by `stride` over the (already test-scale resized,
normalised) image; the last row / column of windows is shifted back to end at the border, so
windows overlap more there. Window logits are summed into the image and divided by how many
windows covered each pixel, then resized (bilinear, align_corners False) to the original size.

Fixed shapes: every window is fed at `window` x `window` (a crop smaller than the window, i.e. an
image smaller than the window in some dimension, is zero-padded at the bottom / right and the
logits of the padding are dropped). mmseg instead runs such a crop at its own size; the padding
keeps the backbone's shape fixed. With `pad_windows_to`, the batch of windows is also padded
with zero windows to a fixed count, so a jitted `logits_fn` compiles once for the whole dataset
(6 covers the ADE20K test scale (2048, 512) with window 512 and stride 341; see
`num_windows`). The stitching and the final resize run as eager jnp ops on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

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
