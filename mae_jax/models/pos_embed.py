"""Fixed 2-D sin-cos position embeddings and their resizing, laid out as the official MAE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _grid(grid_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid_size, int):
        return grid_size, grid_size
    height, width = grid_size
    return int(height), int(width)


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """positions: [M] -> [M, embed_dim] laid out [sin | cos], computed in float64."""
    if embed_dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dimension, got {embed_dim}.")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(
    embed_dim: int, grid_size: int | tuple[int, int], *, cls_token: bool = False
) -> np.ndarray:
    """Official MAE 2-D sin-cos table: [(1 if cls_token) + h*w, embed_dim] float32.

    The first half of the channels encodes the column (w) coordinate and the second half the
    row (h) coordinate, which is what the official code computes (its meshgrid names are
    swapped). Tokens are in row-major patch order; the cls row is all zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}.")
    height, width = _grid(grid_size)
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    table = np.concatenate(
        [sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1
    )
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of PyTorch's bicubic (A=-0.75, align_corners=False) 1-D resampling."""
    a = -0.75
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for out_index in range(out_size):
        source = (out_index + 0.5) * scale - 0.5
        base = int(np.floor(source))
        t = source - base
        taps = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for offset, weight in zip(range(-1, 3), taps, strict=True):
            weights[out_index, min(max(base + offset, 0), in_size - 1)] += weight
    return weights


def resize_grid_bicubic(
    tokens: np.ndarray | jax.Array,
    old_grid: int | tuple[int, int],
    new_grid: int | tuple[int, int],
) -> np.ndarray | jax.Array:
    """tokens: [..., h*w, D] on a row-major grid -> [..., h'*w', D], bicubic like PyTorch.

    Matches `F.interpolate(mode="bicubic", align_corners=False)` as used by the official
    `interpolate_pos_embed` (no antialiasing, clamped borders).
    """
    old_h, old_w = _grid(old_grid)
    new_h, new_w = _grid(new_grid)
    if tokens.shape[-2] != old_h * old_w:
        raise ValueError(f"Expected {old_h * old_w} grid tokens, got {tokens.shape[-2]}.")
    if (old_h, old_w) == (new_h, new_w):
        return tokens
    xp = jnp if isinstance(tokens, jax.Array) else np
    grid = tokens.reshape(*tokens.shape[:-2], old_h, old_w, tokens.shape[-1])
    rows = xp.asarray(_cubic_weights(old_h, new_h), dtype=grid.dtype)
    cols = xp.asarray(_cubic_weights(old_w, new_w), dtype=grid.dtype)
    resized = xp.einsum("ph,qw,...hwd->...pqd", rows, cols, grid)
    return resized.reshape(*tokens.shape[:-2], new_h * new_w, tokens.shape[-1])


def resize_pos_embed(
    pos_embed: np.ndarray,
    new_grid: int | tuple[int, int],
    *,
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> np.ndarray:
    """pos_embed: [1, prefix + h*w, D] -> [1, prefix + h'*w', D]; prefix (cls) rows kept.

    The official `interpolate_pos_embed` assumes a square grid when `old_grid` is not given.
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        side = int(round(grid_tokens.shape[1] ** 0.5))
        if side * side != grid_tokens.shape[1]:
            raise ValueError(
                f"Cannot infer the grid of {grid_tokens.shape[1]} position tokens: "
                "pass old_grid=(height, width)."
            )
        old_grid = side
    resized = resize_grid_bicubic(grid_tokens, old_grid, new_grid)
    return np.concatenate([prefix, np.asarray(resized, dtype=pos_embed.dtype)], axis=1)
