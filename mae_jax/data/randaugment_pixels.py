"""RandAugment's pixel ops on the accelerators (`mae_jax.data.randaugment_device` runs them):
PIL's lookup tables (AutoContrast, Equalize, Invert, Posterize, Solarize, timm's SolarizeAdd)
and blends (Color, Contrast, Brightness, Sharpness), bit for bit.

AutoContrast's float64 table is reproduced in integers (`_autocontrast_lut`); the blends'
float32 products are rounded as PIL's C code rounds them even where the compiler fuses
multiply-adds (`_product`). tests/test_randaugment_device_ops.py checks each against PIL, on
the GPU too (gpu_check.sh). No TensorFlow here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# A layer's op: its code (int32) and arguments; `mae_jax.data.randaugment_device.STAGES` says
# which stage computes each.
OPS = ("identity", "affine", "autocontrast", "equalize", "invert", "posterize", "solarize",
       "solarize_add", "color", "contrast", "brightness", "sharpness")
CODE = {name: code for code, name in enumerate(OPS)}
TABLE_OPS = ("invert", "posterize", "solarize", "solarize_add")
BLEND_OPS = ("color", "contrast", "brightness", "sharpness")


# ----------------------------------------------------------------------------- Lookup tables


def statistics_lut(image: jax.Array, code: jax.Array) -> jax.Array:
    """int32 [3, 256]: ``ImageOps.autocontrast`` / ``equalize``'s table of uint8 [H, W, 3]
    `image` for those codes, the identity for the others."""
    identity = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (3, 256))
    # One 1-D scatter (6x faster than [3, 256] on a CPU); min / max read off the histogram.
    bins = (image.reshape(-1, 3).astype(jnp.int32) + 256 * jnp.arange(3)).ravel()
    hist = jnp.zeros(3 * 256, jnp.int32).at[bins].add(1).reshape(3, 256)
    lo = jnp.min(jnp.where(hist > 0, identity, 255), axis=1, keepdims=True)
    hi = jnp.max(jnp.where(hist > 0, identity, 0), axis=1, keepdims=True)
    table = jnp.where(code == CODE["autocontrast"], _autocontrast_lut(lo, hi, identity), identity)
    return jnp.where(code == CODE["equalize"], _equalize_lut(hist, hi, identity), table)


def simple_lut(code: jax.Array, arg: jax.Array) -> jax.Array:
    """int32 [3, 256]: the table of ``invert``, ``posterize`` (`arg` bits), ``solarize``
    (threshold) or timm's ``solarize_add`` (addition), the identity for other codes."""
    identity = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (3, 256))
    value = arg.astype(jnp.int32)
    tables = {
        "invert": 255 - identity,
        "posterize": _posterize_lut(identity, arg),
        "solarize": jnp.where(identity < value, identity, 255 - identity),
        "solarize_add": jnp.where(identity < 128, jnp.minimum(255, identity + value), identity),
    }
    table = identity
    for name, values in tables.items():
        table = jnp.where(code == CODE[name], values, table)
    return table


def lookup(image: jax.Array, table: jax.Array) -> jax.Array:
    """PIL ``image.point(table)``: uint8 [H, W, 3], int32 [3, 256] -> uint8 [H, W, 3]."""
    # Written by a scatter: computed once, not fused into the gather once a pixel (4x on a CPU).
    table = jnp.zeros(3 * 256, jnp.uint8).at[jnp.arange(3 * 256)].set(
        jnp.clip(table, 0, 255).astype(jnp.uint8).ravel(), unique_indices=True)
    return table[image.astype(jnp.int32) + 256 * jnp.arange(3)]


def _autocontrast_lut(lo, hi, identity):
    """``ImageOps.autocontrast``'s table, PIL's bits: [lo, hi] of each channel stretched to
    [0, 255] (constant channels unchanged). PIL computes int(ix * scale - lo * scale) in
    float64 with scale = 255 / (hi - lo); here the exact floor((ix - lo) * 255 / (hi - lo)) in
    integers, less one at the (lo, hi, ix) where PIL's float64 lands just below a whole number
    (`_autocontrast_shortfalls`: e.g. lo 0, hi 25 maps 25 to 254)."""
    stretched = jnp.floor_divide((identity - lo) * 255, jnp.maximum(hi - lo, 1))
    shortfalls = jnp.asarray(_autocontrast_shortfalls())
    keys = (lo * 256 + hi) * 256 + identity
    found = shortfalls[jnp.minimum(jnp.searchsorted(shortfalls, keys), len(shortfalls) - 1)]
    stretched = jnp.clip(stretched - (found == keys), 0, 255)
    return jnp.where(hi > lo, stretched, identity)


@functools.cache
def _autocontrast_shortfalls():
    """Sorted int32 keys (lo * 256 + hi) * 256 + ix of every lo < hi, ix in [0, 255] where
    PIL's float64 ``int(ix * scale + offset)`` (scale = 255.0 / (hi - lo), offset = -lo *
    scale) is one below the exact floor((ix - lo) * 255 / (hi - lo)) (never more: a float64
    rounding can only pull a whole number below itself; 12,094 keys)."""
    lo, hi = (a.ravel() for a in np.triu_indices(256, 1))
    ix = np.arange(256, dtype=np.float64)[None, :]
    scale = (255.0 / (hi - lo))[:, None]
    pil = np.trunc(ix * scale + (-lo[:, None] * scale))
    exact = np.floor_divide((ix.astype(np.int64) - lo[:, None]) * 255, (hi - lo)[:, None])
    rows, cols = np.nonzero((pil != exact) & (exact >= 0) & (exact <= 255))
    return np.sort((lo[rows] * 256 + hi[rows]) * 256 + cols).astype(np.int32)


def _equalize_lut(hist, hi, identity):
    """``ImageOps.equalize`` of the image with `hist` [3, 256] and maximum `hi` [3, 1]: PIL's
    integer histogram equalisation (the same table)."""
    top_count = jnp.take_along_axis(hist, hi, axis=1)
    step = (hist.sum(axis=1, keepdims=True) - top_count) // 255
    below = jnp.cumsum(hist, axis=1) - hist
    safe_step = jnp.maximum(step, 1)
    equalized = (safe_step // 2 + below) // safe_step
    keep = ((hist > 0).sum(axis=1, keepdims=True) <= 1) | (step == 0)
    return jnp.where(keep, identity, equalized)


def _posterize_lut(identity, bits):
    """``ImageOps.posterize``: the `bits` (0-8) most significant bits of each value."""
    shift = 8 - jnp.clip(bits.astype(jnp.int32), 0, 8)
    return (identity >> shift) << shift


# ----------------------------------------------------------------------------- Blends


def _luma(image):
    """PIL ``convert("L")``: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16, int32 [H, W]."""
    rgb = image.astype(jnp.int32)
    return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def _product(factor: jax.Array, values: jax.Array) -> jax.Array:
    """float32 factor * values (whole numbers, |values| <= 255) rounded once, as PIL's C
    code rounds it before the sum it feeds, whether or not the compiler fuses that sum into a
    multiply-add (XLA:CPU does: a level off at times). The factor is split into 15 and 9
    significant bits: both partial products are exact, their sum rounds once either way."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(factor, jnp.float32), jnp.int32)
    high = jax.lax.bitcast_convert_type(bits & ~0x1FF, jnp.float32)
    return high * values + (factor - high) * values


def smooth(image: jax.Array) -> jax.Array:
    """``ImageFilter.SMOOTH`` (3 x 3 [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, border pixels
    kept) in PIL's float32 order, as float32 values of uint8 [H, W, 3]."""
    x = image.astype(jnp.float32)
    edge = jnp.float32(1.0) / jnp.float32(13.0)
    centre = jnp.float32(5.0) / jnp.float32(13.0)

    def row(rows, middle):
        return ((_product(edge, rows[:, :-2]) + _product(middle, rows[:, 1:-1]))
                + _product(edge, rows[:, 2:]))

    total = 0.5 + row(x[2:], edge)
    total = total + row(x[1:-1], centre)
    total = total + row(x[:-2], edge)
    inner = jnp.floor(jnp.clip(total, 0.0, 255.0))
    return x.at[1:-1, 1:-1].set(inner)


def blend_op(image: jax.Array, code: jax.Array, factor: jax.Array,
             ops: tuple[str, ...] = BLEND_OPS) -> jax.Array:
    """``ImageEnhance.<op>(image).enhance(factor)`` for the blend op `code` among `ops` (PIL's
    ``blend``: degenerate + factor * (image - degenerate) in float32, clamped and truncated);
    other codes leave the image unchanged. Only the degenerate images of `ops` are computed."""
    x = image.astype(jnp.float32)
    luma = _luma(image)
    # int(mean(L) + 0.5) as integers: exact where PIL's float64 mean is.
    mean = (2 * luma.sum() + luma.size) // (2 * luma.size)
    degenerates = {
        "color": lambda: jnp.broadcast_to(luma[..., None], image.shape).astype(jnp.float32),
        "contrast": lambda: jnp.full(image.shape, mean, jnp.float32),
        "brightness": lambda: jnp.zeros(image.shape, jnp.float32),
        "sharpness": lambda: smooth(image),
    }
    degenerate, scale = x, jnp.float32(1.0)
    for name in ops:
        chosen = code == CODE[name]
        degenerate = jnp.where(chosen, degenerates[name](), degenerate)
        scale = jnp.where(chosen, factor, scale)
    blended = degenerate + _product(scale, x - degenerate)
    return jnp.floor(jnp.clip(blended, 0.0, 255.0)).astype(jnp.uint8)
