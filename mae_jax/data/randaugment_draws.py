"""RandAugment's draws for a whole batch in numpy, encoded for the accelerators (no TensorFlow).

The on-device input (`mae_jax.data.on_device.OnDeviceIterator` with ``randaugment``) draws each
example's layers here on the host, vectorised over the batch (microseconds a batch, no per-image
Python), and `mae_jax.data.randaugment_device.apply_layers` runs them on the devices after the
crop and resize there. The draws follow timm 0.3.2's `RandAugment` / `AugmentOp`:

  * ``num_layers`` ops chosen uniformly with replacement from the op list (``np.random.choice``),
  * each applied with probability ``prob`` (timm skips when ``random() > prob``),
  * magnitude ``gauss(magnitude, magnitude_std)`` clipped to [0, 10],
  * signed arguments negated with probability 0.5 (``_randomly_negate``),

and each chosen op's level becomes its argument in float64 as timm's ``_LEVEL_TO_ARG`` computes
it, the same operations as the TensorFlow encoding of the canvas path
(`mae_jax.data.randaugment_program`; tests/test_on_device_randaugment.py compares them). Only the
random stream differs from the host path's (numpy's, not TensorFlow's stateless ops).
"""

from __future__ import annotations

import math

import numpy as np

from mae_jax.data.randaugment_device import CODE, IDENTITY_MATRIX, NUM_ARGS
from mae_jax.data.randaugment_policy import GEOMETRIC_OPS, MAX_LEVEL, op_names


def _rotation(degrees: np.ndarray, size: int) -> np.ndarray:
    """PIL ``Image.rotate``'s affine matrix (no expand, centre (W / 2, H / 2)): [n, 6]."""
    center = size / 2.0
    angle = -(np.mod(degrees, 360.0) * (math.pi / 180.0))
    cos = np.round(np.cos(angle) * 1e15) / 1e15  # PIL: round(x, 15)
    sin = np.round(np.sin(angle) * 1e15) / 1e15
    c = cos * -center + sin * -center + center
    f = -sin * -center + cos * -center + center
    return np.stack([cos, sin, c, -sin, cos, f], axis=-1)


def _matrix(n: int, **entries) -> np.ndarray:
    """[n, 6] affine matrices: the identity with the named entries (a .. f) replaced."""
    out = np.tile(np.asarray(IDENTITY_MATRIX, np.float64), (n, 1))
    for name, value in entries.items():
        out[:, "abcdef".index(name)] = value
    return out


def _geometric(name: str, frac: np.ndarray, sign: np.ndarray, size: int,
               translate_pct: float) -> np.ndarray:
    if name == "Rotate":
        return _rotation(sign * (frac * 30.0), size)
    if name in ("ShearX", "ShearY"):
        return _matrix(len(frac), **{"b" if name == "ShearX" else "d": sign * (frac * 0.3)})
    pixels = sign * (frac * translate_pct) * float(size)  # timm: pct * img.size[0 or 1]
    return _matrix(len(frac), **{"c" if name == "TranslateXRel" else "f": pixels})


def _pixel(name: str, frac: np.ndarray, sign: np.ndarray) -> tuple[str, np.ndarray]:
    """(the `randaugment_device` op, its float64 argument [n]) of a non-geometric timm op."""
    base = name.removesuffix("Increasing")
    increasing = base != name
    if base in ("AutoContrast", "Equalize", "Invert"):
        return base.lower(), np.zeros_like(frac)
    if base == "Posterize":
        bits = np.floor(frac * 4.0)
        return "posterize", 4.0 - bits if increasing else bits
    if base == "Solarize":
        threshold = np.floor(frac * 256.0)
        return "solarize", 256.0 - threshold if increasing else threshold
    if base == "SolarizeAdd":
        return "solarize_add", np.floor(frac * 110.0)
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = 1.0 + sign * (frac * 0.9) if increasing else frac * 1.8 + 0.1
        return base.lower(), factor
    raise ValueError(f"unknown RandAugment op {name!r}")


def encode(names, op_index: np.ndarray, level: np.ndarray, negate: np.ndarray, size: int,
           translate_pct: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """Op codes int32 [...] and float32 arguments [..., NUM_ARGS] of timm ops ``names[op_index]``
    at magnitude ``level`` (float64, in [0, 10]) with sign draws ``negate``, on size x size
    images."""
    op_index, level = np.asarray(op_index), np.asarray(level, np.float64)
    frac = level / MAX_LEVEL  # timm: level / _MAX_LEVEL * range
    sign = np.where(np.asarray(negate), -1.0, 1.0)
    codes = np.zeros(op_index.shape, np.int32)
    args = np.zeros((*op_index.shape, NUM_ARGS), np.float64)
    for index, name in enumerate(names):
        chosen = op_index == index
        if not chosen.any():
            continue
        if name in GEOMETRIC_OPS:
            codes[chosen] = CODE["affine"]
            args[chosen] = _geometric(name, frac[chosen], sign[chosen], size, translate_pct)
        else:
            op, value = _pixel(name, frac[chosen], sign[chosen])
            codes[chosen], args[chosen, 0] = CODE[op], value
    return codes, args.astype(np.float32)


def draw_layers(rng: np.random.Generator, shape: tuple[int, ...], *, num_ops: int,
                magnitude: float = 9, magnitude_std: float = 0.5,
                prob: float = 0.5) -> dict[str, np.ndarray]:
    """timm RandAugment's random choices for `shape` = (images, layers): "op_index" (uniform
    over num_ops, with replacement), "apply" (probability prob), "magnitude" (float64
    gauss(magnitude, magnitude_std) clipped to [0, 10]), "negate" (probability 0.5); the
    fields of `mae_jax.data.randaugment.sample_layers`."""
    if magnitude_std < 0:
        raise ValueError(f"magnitude_std must be >= 0, got {magnitude_std}")
    if min(shape, default=0) < 0:
        raise ValueError(f"the number of images and layers must be >= 0, got {shape}")
    op_index = rng.integers(num_ops, size=shape)
    apply = rng.random(shape) <= prob  # timm skips when random() > prob
    level = np.full(shape, float(magnitude))
    if magnitude_std > 0:
        level = level + magnitude_std * rng.standard_normal(shape)
    negate = rng.random(shape) > 0.5
    return {"op_index": op_index, "apply": apply, "magnitude": np.clip(level, 0.0, MAX_LEVEL),
            "negate": negate}


def draw_programs(rng: np.random.Generator, batch: int, size: int, *, num_layers: int = 2,
                  magnitude: float = 9, magnitude_std: float = 0.5, increasing: bool = True,
                  prob: float = 0.5, translate_pct: float = 0.45) -> dict[str, np.ndarray]:
    """{"ra_code": int32 [batch, num_layers], "ra_args": float32 [batch, num_layers, NUM_ARGS]}:
    `draw_layers` for `batch` size x size images, encoded (keyword arguments as
    `mae_jax.data.randaugment_policy.parse_rand_augment` returns them). Skipped layers get the
    identity code."""
    names = op_names(increasing)
    draws = draw_layers(rng, (batch, num_layers), num_ops=len(names), magnitude=magnitude,
                        magnitude_std=magnitude_std, prob=prob)
    codes, args = encode(names, draws["op_index"], draws["magnitude"], draws["negate"], size,
                         translate_pct)
    return {"ra_code": np.where(draws["apply"], codes, CODE["identity"]).astype(np.int32),
            "ra_args": args}
