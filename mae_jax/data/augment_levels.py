"""RandAugment magnitude -> op argument, as timm 0.3.2's ``_LEVEL_TO_ARG`` computes it.

Levels are float64 tensors in [0, MAX_LEVEL]; ``negate`` is the outcome of timm's
``_randomly_negate`` for signed arguments. Results are float64 (int32 for bit counts, thresholds
and additions), computed without a detour through float32.
"""

import tensorflow as tf

from mae_jax.data.augment_ops import to_float64
from mae_jax.data.randaugment_policy import MAX_LEVEL


def _signed(value, negate):
    return tf.where(tf.cast(negate, tf.bool), -value, value)


def rotate_level_to_arg(level, negate):
    """Degrees in [-30, 30]: ``level / 10 * 30``, negated when ``negate``."""
    return _signed(to_float64(level) / MAX_LEVEL * 30.0, negate)


def shear_level_to_arg(level, negate):
    """Shear factor in [-0.3, 0.3]: ``level / 10 * 0.3``, negated when ``negate``."""
    return _signed(to_float64(level) / MAX_LEVEL * 0.3, negate)


def translate_rel_level_to_arg(level, negate, translate_pct=0.45):
    """Fraction of the image size in [-0.45, 0.45]: ``level / 10 * translate_pct``, signed."""
    return _signed(to_float64(level) / MAX_LEVEL * translate_pct, negate)


def translate_abs_level_to_arg(level, negate, translate_const=100):
    """Pixels ``level / 10 * translate_const``, signed (timm's AutoAugment translate; unused by
    RandAugment, kept for completeness)."""
    return _signed(to_float64(level) / MAX_LEVEL * float(translate_const), negate)


def enhance_level_to_arg(level):
    """Enhance factor in [0.1, 1.9]: ``level / 10 * 1.8 + 0.1`` (non-increasing ops)."""
    return to_float64(level) / MAX_LEVEL * 1.8 + 0.1


def enhance_increasing_level_to_arg(level, negate):
    """Enhance factor ``1 +- level / 10 * 0.9`` in [0.1, 1.9] (timm's "Increasing" ops)."""
    return 1.0 + _signed(to_float64(level) / MAX_LEVEL * 0.9, negate)


def posterize_level_to_arg(level):
    """Bits kept ``int(level / 10 * 4)`` in [0, 4] (TPU EfficientNet variant)."""
    return tf.cast(tf.floor(to_float64(level) / MAX_LEVEL * 4.0), tf.int32)


def posterize_increasing_level_to_arg(level):
    """Bits kept ``4 - int(level / 10 * 4)`` in [4, 0]."""
    return 4 - posterize_level_to_arg(level)


def solarize_level_to_arg(level):
    """Threshold ``int(level / 10 * 256)`` in [0, 256]."""
    return tf.cast(tf.floor(to_float64(level) / MAX_LEVEL * 256.0), tf.int32)


def solarize_increasing_level_to_arg(level):
    """Threshold ``256 - int(level / 10 * 256)`` in [256, 0]."""
    return 256 - solarize_level_to_arg(level)


def solarize_add_level_to_arg(level):
    """Addition ``int(level / 10 * 110)`` in [0, 110] (threshold stays 128)."""
    return tf.cast(tf.floor(to_float64(level) / MAX_LEVEL * 110.0), tf.int32)
