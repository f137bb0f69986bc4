"""RandAugment's ops on the accelerators, after the resize there (`mae_jax.data.device_resize`).

With ``data.device_resize_canvas`` and ``data.randaugment`` both set, the host only decodes each
crop window and draws the example's RandAugment choices (`mae_jax.data.randaugment_program`,
the same stateless draws as the host path `mae_jax.data.randaugment.rand_augment`); each layer
arrives here as an op code and up to six float32 arguments:

  * ``affine``: the 2 x 3 matrix of Rotate / ShearX / ShearY / TranslateXRel / TranslateYRel
    (PIL's bicubic affine warp, the a = -1 kernel, fill colour outside),
  * ``autocontrast``, ``equalize``, ``invert``, ``posterize`` (bits), ``solarize`` (threshold),
    ``solarize_add`` (addition): a 256-entry lookup table per channel,
  * ``color``, ``contrast``, ``brightness``, ``sharpness`` (factor): PIL's blend with the op's
    degenerate image,
  * ``identity``: the layer was skipped (timm applies each layer with probability 0.5).

Static shapes, no branches: a layer is five stages (`STAGES`), each computed on the images
that picked it, gathered into slots sized so that more picks than slots has probability below
1e-9 (`apply_layers`). The warp's coordinates and cubic are float32 where PIL uses float64: a
warped image can differ from the host path's by a level at some pixels, and a sample right on
the border can take the fill colour in one and not the other (tests/test_randaugment_device.py
bounds both). The tables and blends (`mae_jax.data.randaugment_pixels`) give PIL's bits
(tests/test_randaugment_device_ops.py, which gpu_check.sh runs on the GPU too). No TensorFlow
here.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mae_jax.data import randaugment_pixels as pixels
from mae_jax.data.constants import IMAGENET_MEAN_UINT8

CODE = pixels.CODE  # a layer's op
NUM_ARGS = 6
IDENTITY_MATRIX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# timm's `img_mean` hparam for the ImageNet mean: the colour geometric ops fill with.
DEFAULT_FILL = IMAGENET_MEAN_UINT8
# The blends without PIL's smoothing (Sharpness has a stage of its own).
_PLAIN_BLENDS = tuple(op for op in pixels.BLEND_OPS if op != "sharpness")
# The stages of a layer and the share of a batch that timm's op lists (15 ops) pick for each,
# each layer applied with probability 0.5: "warp", Rotate (PIL's 4 x 4 bicubic taps a pixel);
# "shift", ShearX / TranslateXRel (pixels move along rows) and ShearY / TranslateYRel (along
# columns), 4 taps a pixel (`shift`); "statistics", AutoContrast / Equalize (tables from image
# statistics); "pixel", 4 other tables and 3 blends; "sharpness", the blend with PIL's
# smoothing (25x the cost of the other blends on a CPU: on their images only).
STAGES = {"warp": (("affine",), 1 / 30), "shift": (("affine",), 4 / 30),
          "statistics": (("autocontrast", "equalize"), 2 / 30),
          "pixel": (pixels.TABLE_OPS + _PLAIN_BLENDS, 7 / 30),
          "sharpness": (("sharpness",), 1 / 30)}
# A stage computes on the images that picked it, gathered into a fixed number of slots: the
# fewest for which more picks than slots has probability below this (binomial, per stage and
# batch of a device). Picks past the slots keep that layer unapplied.
OVERFLOW_PROBABILITY = 1e-9


def apply_layers(images: jax.Array, codes: jax.Array, args: jax.Array, fill=DEFAULT_FILL, *,
                 slots: int | None = None) -> jax.Array:
    """images uint8 [B, H, W, 3] (H, W >= 3), codes int32 [B, L] (`CODE`), args float32
    [B, L, NUM_ARGS] -> uint8 [B, H, W, 3]: each example's L layers in order.

    Each layer runs the five `STAGES`, each on the images that picked it (`stage_picks`),
    gathered into `stage_slots(B, share)` slots (`slots`: that many for every stage; B: every
    image, exact). Static shapes, no branches (a conditional would make a GPU wait for the host).
    """
    if codes.ndim != 2 or args.shape != (*codes.shape, NUM_ARGS):
        raise ValueError(f"codes [B, L] and args [B, L, {NUM_ARGS}] expected, got "
                         f"{codes.shape} and {args.shape}")
    fill = jnp.asarray(fill, jnp.float32)
    functions = {
        "warp": lambda image, code, args: warp(image, args, fill),
        "shift": lambda image, code, args: shift(image, args, fill),
        "statistics": lambda image, code, args: pixels.lookup(
            image, pixels.statistics_lut(image, code)),
        "pixel": lambda image, code, args: pixels.blend_op(
            pixels.lookup(image, pixels.simple_lut(code, args[0])), code, args[0], _PLAIN_BLENDS),
        "sharpness": lambda image, code, args: pixels.blend_op(image, code, args[0],
                                                               ("sharpness",)),
    }
    batch = images.shape[0]
    for layer in range(codes.shape[1]):
        code, arg = codes[:, layer], args[:, layer]
        for stage, picked in stage_picks(code, arg).items():
            size = stage_slots(batch, STAGES[stage][1]) if slots is None else min(slots, batch)
            images = _on_picked(jax.vmap(functions[stage]), images, code, arg, picked, size)
    return images


def stage_picks(code: jax.Array, args: jax.Array) -> dict[str, jax.Array]:
    """For each stage of `STAGES`, bool [B]: the images whose layer (code int32 [B], args
    float32 [B, NUM_ARGS]) it runs. An affine matrix that keeps rows (d, e, f = 0, 1, 0) or
    columns (a, b, c = 1, 0, 0) in place is a "shift", any other a "warp"."""
    affine = code == CODE["affine"]
    keeps_rows = (args[:, 3] == 0) & (args[:, 4] == 1) & (args[:, 5] == 0)
    keeps_columns = (args[:, 0] == 1) & (args[:, 1] == 0) & (args[:, 2] == 0)
    picks = {"warp": affine & ~(keeps_rows | keeps_columns),
             "shift": affine & (keeps_rows | keeps_columns)}
    for stage, (ops, _) in STAGES.items():
        if stage not in picks:  # the stages of the other ops: by code
            picks[stage] = jnp.isin(code, jnp.asarray([CODE[name] for name in ops]))
    return picks


@functools.lru_cache(maxsize=256)
def stage_slots(batch: int, share: float, overflow: float = OVERFLOW_PROBABILITY) -> int:
    """The fewest k with P(Binomial(batch, share) > k) < overflow."""
    log_pmf = [math.lgamma(batch + 1) - math.lgamma(k + 1) - math.lgamma(batch - k + 1)
               + k * math.log(share) + (batch - k) * math.log1p(-share)
               for k in range(batch + 1)]
    above = 0.0  # P(X > k), summed from the top
    for k in range(batch, -1, -1):
        if above >= overflow:
            return k + 1
        above += math.exp(log_pmf[k])
    return 0


def _on_picked(function, images, code, args, picked, size):
    """`function(images [n, H, W, 3], code [n], args [n, NUM_ARGS])` on the images where
    `picked` (bool [B]), the first `size` of them in batch order; the others unchanged."""
    if size >= images.shape[0]:
        return jnp.where(picked[:, None, None, None], function(images, code, args), images)
    index = jnp.argsort(~picked, stable=True)[:size]  # the picked ones first
    done = function(images[index], code[index], args[index])
    keep = picked[index][:, None, None, None]
    return images.at[index].set(jnp.where(keep, done, images[index]), unique_indices=True)


# ----------------------------------------------------------------------------- Geometry

# Points clipped to _OUTSIDE beyond the image read taps at most floor(8.5) + 1 = _TAP_REACH beyond.
_OUTSIDE, _TAP_REACH = 8.0, 10


def _pil_cubic(v1, v2, v3, v4, d):
    """PIL Geometry.c BICUBIC (a = -1), its operation order; d = 0 gives v2 exactly."""
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def warp(image: jax.Array, matrix: jax.Array, fill) -> jax.Array:
    """PIL ``Image.transform(AFFINE, matrix, BICUBIC, fillcolor=fill)`` on uint8 [H, W, 3].

    The output pixel centre (x + .5, y + .5) reads the input at (a x' + b y' + c, d x' + e y' +
    f); points outside [0, W) x [0, H) get `fill`, others the 4 x 4 clamped neighbourhood of the
    point shifted by -0.5 (rows first, then the column), clamped to [0, 255] and truncated. The
    identity matrix returns the image unchanged.
    """
    height, width, _ = image.shape
    x_in, y_in, inside = _source_points(height, width, matrix)
    x_floor, y_floor = jnp.floor(x_in), jnp.floor(y_in)
    # A pixel's 4 x 4 taps: one window of the edge-padded image, which holds the clamped reads
    # (2x faster on a CPU than 16 single-pixel gathers).
    padded = jnp.pad(image, ((_TAP_REACH,) * 2, (_TAP_REACH,) * 2, (0, 0)), mode="edge")
    corner = jnp.stack([y_floor, x_floor], axis=-1).astype(jnp.int32) + _TAP_REACH - 1
    taps = jax.vmap(jax.vmap(lambda yx: jax.lax.dynamic_slice(
        padded, (yx[0], yx[1], 0), (4, 4, 3))))(corner)  # uint8 [H, W, 4, 4, 3]
    dx = (x_in - x_floor)[..., None]
    along_x = [_pil_cubic(*(taps[:, :, row, i].astype(jnp.float32) for i in range(4)), dx)
               for row in range(4)]
    values = _pil_cubic(*along_x, (y_in - y_floor)[..., None])
    return _clip_or_fill(values, inside, fill)


def shift(image: jax.Array, matrix: jax.Array, fill) -> jax.Array:
    """`warp` for a matrix that moves pixels along rows only (d, e, f = 0, 1, 0: ShearX,
    TranslateXRel) or columns only (a, b, c = 1, 0, 0: ShearY, TranslateYRel), with the 4
    taps along that axis: the same bits, since PIL's cubic at a zero fraction returns its
    second sample exactly (the other axis's taps add nothing)."""
    height, width, _ = image.shape
    x_in, y_in, inside = _source_points(height, width, matrix)
    along_columns = (matrix[0] == 1) & (matrix[1] == 0) & (matrix[2] == 0)
    x_floor, y_floor = jnp.floor(x_in), jnp.floor(y_in)
    taps = jnp.arange(4) - 1
    cols = x_floor.astype(jnp.int32)[..., None] + jnp.where(along_columns, 0, taps)
    rows = y_floor.astype(jnp.int32)[..., None] + jnp.where(along_columns, taps, 0)
    index = jnp.clip(rows, 0, height - 1) * width + jnp.clip(cols, 0, width - 1)  # [H, W, 4]
    samples = image.reshape(-1, 3)[index].astype(jnp.float32)  # [H, W, 4, 3]
    frac = jnp.where(along_columns, y_in - y_floor, x_in - x_floor)[..., None]
    values = _pil_cubic(*(samples[:, :, i] for i in range(4)), frac)
    return _clip_or_fill(values, inside, fill)


def _source_points(height: int, width: int, matrix: jax.Array):
    """(x, y) each output pixel centre reads (float32 [H, W], shifted by -0.5 to tap
    coordinates, far-away points clipped so the integer casts stay in range), and whether it
    lies inside the image."""
    a = [matrix[i] for i in range(6)]
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5)[None, :]
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5)[:, None]
    x_in = a[0] * xs + a[1] * ys + a[2]  # [H, W]
    y_in = a[3] * xs + a[4] * ys + a[5]
    inside = (x_in >= 0.0) & (x_in < width) & (y_in >= 0.0) & (y_in < height)
    return (jnp.clip(x_in, -_OUTSIDE, width + _OUTSIDE) - 0.5,
            jnp.clip(y_in, -_OUTSIDE, height + _OUTSIDE) - 0.5, inside)


def _clip_or_fill(values: jax.Array, inside: jax.Array, fill) -> jax.Array:
    """PIL's bicubic result: clamped to [0, 255] and truncated inside, `fill` outside."""
    values = jnp.where(inside[..., None], jnp.floor(jnp.clip(values, 0.0, 255.0)), fill)
    return values.astype(jnp.uint8)
