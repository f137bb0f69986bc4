"""PyTorch's resampling on NHWC arrays, as exact matrices: adaptive average pooling bins and
bilinear resizing (align_corners False). Shapes are static, so everything jits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def adaptive_avg_pool2d(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """x: [B, H, W, C] -> [B, oh, ow, C], PyTorch's `adaptive_avg_pool2d` bins.

    Bin i covers [floor(i * in / out), ceil((i + 1) * in / out)); bins may overlap when `in` is
    not a multiple of `out`, and `out > in` repeats pixels. Shapes are static, so this jits.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    # Averages in (at least) float32, as torch's kernel accumulates; 16-bit weights such as
    # 1/3 would be off by 0.1%. The pooled map is small, so this costs nothing.
    in_dtype, dtype = x.dtype, jnp.promote_types(x.dtype, jnp.float32)
    rows = jnp.asarray(_pool_matrix(x.shape[1], out_h), dtype)
    cols = jnp.asarray(_pool_matrix(x.shape[2], out_w), dtype)
    hp = jax.lax.Precision.HIGHEST  # exact averages even where f32 matmuls default to TF32
    x = jnp.einsum("oh,bhwc->bowc", rows, x.astype(dtype), precision=hp)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=hp).astype(in_dtype)


def _pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch's bilinear resampling along one axis (align_corners False):
    source coordinate (dst + 0.5) * in / out - 0.5, clamped at 0, two nearest pixels."""
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    weight = source - low
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - weight)
    np.add.at(matrix, (np.arange(out_size), high), weight)
    return matrix


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """x: [..., H, W, C] -> [..., h, w, C]; equals torch `F.interpolate(mode="bilinear",
    align_corners=False)` when given `size`, for up- and down-sampling.

    `jax.image.resize` antialiases when downsampling; PyTorch does not. Each axis is resampled
    by a small dense matrix, so forward and backward are matrix products (a gather's gradient
    would be a slow scatter-add on the large upsampled logits).
    """
    if x.ndim < 3:
        raise ValueError(f"resize_bilinear expects [..., H, W, C], got shape {x.shape}")
    height, width = x.shape[-3], x.shape[-2]
    if height != size[0]:  # PyTorch's scale is exactly 1 otherwise: an identity
        rows = jnp.asarray(bilinear_matrix(height, size[0]), x.dtype)
        x = jnp.einsum("oh,...hwc->...owc", rows, x)
    if width != size[1]:
        cols = jnp.asarray(bilinear_matrix(width, size[1]), x.dtype)
        x = jnp.einsum("ow,...hwc->...hoc", cols, x)
    return x
