"""PIL's bicubic resize on the accelerators, for crops with per-example boxes: the PIL path the
official code uses (crop, then PIL's two-pass bicubic resize: Keys a=-0.5, kernel widened when
shrinking, taps outside the crop dropped and the rest renormalised, horizontal pass rounded to
uint8 before the vertical one; Pillow 13 runs the vertical pass first in some downscales,
python-pillow/Pillow#9549, which moves values by rounding only; when enlarging, the CIFAR case,
every Pillow agrees). The crop box is data-dependent, so the resize is two small matmuls with
per-example weight matrices: static shapes throughout. Used by the on-device input
(`mae_jax.data.on_device`) and the device resize of host-decoded crops
(`mae_jax.data.device_resize`). No TensorFlow here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pil_bicubic(x: jax.Array) -> jax.Array:
    """PIL's bicubic_filter: Keys' cubic convolution with a = -0.5, support 2."""
    a = -0.5
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def axis_weights(in_size: int, out_size: int, start, length, scaled_size, offset=0) -> jax.Array:
    """Resampling weights of one axis as PIL computes them (ImagingPrecompute): [in_size, out].

    The window [start, start + length) of the input is resized to `scaled_size` samples and
    samples offset .. offset + out_size - 1 are kept (a crop then resize: offset 0 and
    scaled_size = out_size; a resize then center crop: the whole axis as window). Input taps
    outside the window get no weight and each output's weights are renormalised, as PIL does at
    image borders. The kernel is widened by the scale when shrinking (PIL's antialiasing).
    (jax.image.scale_and_translate would weigh pixels outside the crop: it sees the whole axis.)
    """
    start, length = jnp.asarray(start, jnp.float32), jnp.asarray(length, jnp.float32)
    scale = length / scaled_size
    support_scale = jnp.maximum(scale, 1.0)
    centers = start + (jnp.arange(out_size, dtype=jnp.float32) + offset + 0.5) * scale
    positions = jnp.arange(in_size, dtype=jnp.float32)
    weights = _pil_bicubic((positions[:, None] + 0.5 - centers[None, :]) / support_scale)
    inside = (positions >= start) & (positions < start + length)
    weights = jnp.where(inside[:, None], weights, 0.0)
    total = weights.sum(axis=0, keepdims=True)
    return weights / jnp.where(total == 0, 1.0, total)


def _round_to_uint8_values(x: jax.Array) -> jax.Array:
    """PIL's clip8: round half up, saturate to [0, 255] (kept as float)."""
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def resample(images: jax.Array, row_weights: jax.Array, col_weights: jax.Array) -> jax.Array:
    """PIL's two-pass resize: horizontal pass, rounded to uint8 values, then vertical pass.

    images: uint8 [B, H, W, 3]; row_weights: [B, H, S_h]; col_weights: [B, W, S_w]
    -> uint8 [B, S_h, S_w, 3].
    """
    # HIGHEST: TF32 matmuls (GPU default for float32) would move values by ~0.3 levels.
    highest = jax.lax.Precision.HIGHEST
    x = images.astype(jnp.float32)
    rows = jnp.einsum("bhwc,bwo->bhoc", x, col_weights, precision=highest)
    rows = _round_to_uint8_values(rows)
    out = jnp.einsum("bhoc,bhp->bpoc", rows, row_weights, precision=highest)
    return _round_to_uint8_values(out).astype(jnp.uint8)


def center_geometry(height: int, width: int, size: int) -> tuple[tuple[int, int], ...]:
    """torchvision Resize(size) (shorter side to `size`, longer truncated) + CenterCrop(size):
    ((scaled_height, top), (scaled_width, left)) in the resized image."""
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    scaled_h, scaled_w = (size, new_long) if height <= width else (new_long, size)
    return ((scaled_h, int(round((scaled_h - size) / 2.0))),
            (scaled_w, int(round((scaled_w - size) / 2.0))))


def resized_crop(images: jax.Array, boxes: jax.Array, flips: jax.Array, size: int) -> jax.Array:
    """torchvision's resized_crop + hflip on PIL images: uint8 [B, H, W, 3], boxes int32 [B, 4]
    (top, left, height, width), flips bool [B] -> uint8 [B, size, size, 3]."""
    _, height, width, _ = images.shape
    rows = jax.vmap(lambda top, h: axis_weights(height, size, top, h, size))(boxes[:, 0],
                                                                             boxes[:, 2])
    cols = jax.vmap(lambda left, w: axis_weights(width, size, left, w, size))(boxes[:, 1],
                                                                              boxes[:, 3])
    # Flipping the output = reversing the output axis of the column weights.
    cols = jnp.where(flips[:, None, None], cols[:, :, ::-1], cols)
    return resample(images, rows, cols)


def center_resize(images: jax.Array, size: int) -> jax.Array:
    """torchvision Resize(size) + CenterCrop(size): uint8 [B, H, W, 3] -> [B, size, size, 3]."""
    batch, height, width, _ = images.shape
    (scaled_h, top), (scaled_w, left) = center_geometry(height, width, size)
    rows = axis_weights(height, size, 0, height, scaled_h, top)
    cols = axis_weights(width, size, 0, width, scaled_w, left)
    return resample(images, jnp.broadcast_to(rows, (batch, *rows.shape)),
                    jnp.broadcast_to(cols, (batch, *cols.shape)))
