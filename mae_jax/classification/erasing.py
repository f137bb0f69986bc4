"""timm's RandomErasing (as MAE fine-tuning uses it) on a batch of normalised images, in JAX.

The official recipe appends ``RandomErasing(0.25, mode='pixel', max_count=1)`` after
``ToTensor() + Normalize(mean, std)``, so it acts on the *normalised* float image. Batches arrive
as uint8 and are normalised inside the jitted train step, so erasing runs there too, per image
(vmapped), before Mixup / CutMix (timm applies it in the dataset transform, i.e. first). Per image
timm (0.3.2 / 0.4.5 ``RandomErasing._erase``):

  * does nothing with probability ``1 - probability`` (``random() > probability``),
  * draws ``count`` in [min_count, max_count] (1 here) boxes; for each box it tries up to 10 times:
    ``target_area = uniform(min_area, max_area) * H * W / count``,
    ``aspect = exp(uniform(log(min_aspect), log(max_aspect)))`` (max_aspect = 1 / min_aspect),
    ``h = int(round(sqrt(target_area * aspect)))``, ``w = int(round(sqrt(target_area / aspect)))``;
    the first attempt with ``w < W and h < H`` is used, at ``top = randint(0, H - h)``,
    ``left = randint(0, W - w)`` (both ends inclusive); if all attempts fail there is no box,
  * fills the box with per-pixel N(0, 1) noise ('pixel'), one N(0, 1) colour per channel
    ('rand') or zeros ('const').

Static shapes throughout: all attempts are drawn at once and the box is an iota mask. The draws
follow timm's distributions, not its Python RNG stream; rounding is half-to-even in both.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODES = ("pixel", "rand", "const")


def sample_erasing_boxes(
    key: jax.Array,
    height: int,
    width: int,
    *,
    probability: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    min_count: int = 1,
    max_count: int = 1,
    max_attempts: int = 10,
) -> tuple[jax.Array, ...]:
    """timm's erase boxes for one ``height x width`` image.

    Returns ``(active, top, left, box_h, box_w)``, each ``[max_count]`` (bool / int32): box ``k``
    is erased iff ``active[k]`` (the image was selected, ``k < count`` and an attempt fit).
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if not 0.0 < min_area <= max_area:
        raise ValueError(f"need 0 < min_area <= max_area, got {min_area}, {max_area}")
    if not 1 <= min_count <= max_count:
        raise ValueError(f"need 1 <= min_count <= max_count, got {min_count}, {max_count}")
    max_aspect = max_aspect or 1.0 / min_aspect
    # One uniform draw split into every variate: each separate draw is a threefry block that
    # costs seconds of XLA compile time on a CPU.
    attempts = max_count * max_attempts
    draws = jax.random.uniform(key, (2 + 2 * attempts + 2 * max_count,))
    selected = draws[0] <= probability
    # random.randint(min_count, max_count), both ends inclusive
    count = min_count + jnp.floor(draws[1] * (max_count - min_count + 1)).astype(jnp.int32)
    count = jnp.minimum(count, max_count)
    shape = (max_count, max_attempts)
    area = min_area + (max_area - min_area) * draws[2:2 + attempts].reshape(shape)
    target_area = area * (height * width) / count.astype(jnp.float32)
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * draws[2 + attempts:2 + 2 * attempts])
    aspect = aspect.reshape(shape)
    box_h = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    box_w = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (box_w < width) & (box_h < height)
    first = jnp.argmax(fits, axis=1)  # the first attempt that fits (0 when none does)
    found = jnp.any(fits, axis=1)
    box_h = jnp.take_along_axis(box_h, first[:, None], axis=1)[:, 0]
    box_w = jnp.take_along_axis(box_w, first[:, None], axis=1)[:, 0]

    def randint_inclusive(upper, uniform):  # random.randint(0, upper) as a floor of a uniform
        return jnp.minimum(jnp.floor(uniform * (upper + 1)).astype(jnp.int32), upper)

    offsets = draws[2 + 2 * attempts:].reshape(2, max_count)
    top = randint_inclusive(jnp.maximum(height - box_h, 0), offsets[0])
    left = randint_inclusive(jnp.maximum(width - box_w, 0), offsets[1])
    active = selected & found & (jnp.arange(max_count) < count)
    return active, top, left, box_h, box_w


def erase_image(image: jax.Array, boxes: tuple[jax.Array, ...], fills: jax.Array) -> jax.Array:
    """Fills the active `boxes` (from `sample_erasing_boxes`) of one image [H, W, C].

    fills: [num_boxes, H, W, C] ('pixel'), [num_boxes, C] ('rand') or [num_boxes] ('const').
    """
    height, width, _ = image.shape
    active, top, left, box_h, box_w = boxes
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, width, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (height, width, 1), 1)
    for k in range(active.shape[0]):  # later boxes overwrite earlier ones, as in timm's loop
        inside = (
            active[k]
            & (rows >= top[k]) & (rows < top[k] + box_h[k])
            & (cols >= left[k]) & (cols < left[k] + box_w[k])
        )
        image = jnp.where(inside, fills[k], image)
    return image


def random_erasing(
    images: jax.Array,
    key: jax.Array,
    *,
    probability: float = 0.25,
    mode: str = "pixel",
    min_count: int = 1,
    max_count: int = 1,
    **box_options,
) -> jax.Array:
    """timm ``RandomErasing(probability, mode=mode, max_count=max_count)`` on every image.

    images: normalised float [B, H, W, C]; key: one JAX key for the whole batch.
    Defaults are the MAE fine-tuning ones (``--reprob 0.25 --remode pixel --recount 1``).
    ``box_options``: min_area, max_area, min_aspect, max_aspect, max_attempts.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"expected normalised float images [B, H, W, C], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if probability == 0.0:
        return images

    batch, height, width, channels = images.shape
    box_key, fill_key = jax.random.split(key)
    boxes = jax.vmap(lambda k: sample_erasing_boxes(
        k, height, width, probability=probability, min_count=min_count, max_count=max_count,
        **box_options))(jax.random.split(box_key, batch))
    # One draw for the whole batch (see sample_erasing_boxes on compile time).
    if mode == "pixel":
        fills = jax.random.normal(fill_key, (batch, max_count, height, width, channels),
                                  images.dtype)
    elif mode == "rand":
        fills = jax.random.normal(fill_key, (batch, max_count, channels), images.dtype)
    else:
        fills = jnp.zeros((batch, max_count), images.dtype)
    return jax.vmap(erase_image)(images, boxes, fills)
