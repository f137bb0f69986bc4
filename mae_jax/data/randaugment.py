"""RandAugment as timm 0.3.2 builds it for MAE fine-tuning, in TensorFlow graph ops.

The official MAE fine-tuning recipe (``main_finetune.py`` -> ``util/datasets.py``) calls timm's
``create_transform(..., auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
mean=IMAGENET_DEFAULT_MEAN)``, which gives ``rand_augment_transform('rand-m9-mstd0.5-inc1',
hparams)`` with ``translate_const=int(0.45 * img_size)``, ``img_mean=(124, 116, 104)`` (the fill
colour) and bicubic resampling. Per image that transform:

  * picks ``num_layers`` (2) ops uniformly *with replacement* from the 15 "increasing" ops
    (``_RAND_INCREASING_TRANSFORMS``),
  * applies each with probability 0.5,
  * draws the op's magnitude from ``gauss(9, 0.5)`` clipped to [0, 10],
  * maps the magnitude to the op's argument (``_LEVEL_TO_ARG``), negating signed arguments with
    probability 0.5 (``_randomly_negate``),
  * runs the op with PIL on the uint8 image.

Each op is a PIL function reproduced in TensorFlow: the pixel ops in `mae_jax.data.augment_ops`,
the geometric ones (PIL's bicubic affine warp) in `mae_jax.data.augment_affine`; the magnitude ->
argument mappings in `mae_jax.data.augment_levels`. The op lists and the config string are in
`mae_jax.data.randaugment_policy` (no TensorFlow); this module makes the random draws and the
graph that applies them.

Translation: timm's RandAugment op lists use ``TranslateXRel`` / ``TranslateYRel`` (shift =
``0.45 * level / 10`` of the image width / height, i.e. up to 100.8 px at 224), *not* the
absolute ``translate_const`` variant; ``translate_const`` is only read by the AutoAugment
policies. This module follows the op lists.

Randomness comes from ``tf.random.stateless_*`` ops keyed by a ``[2]`` integer seed, so
``rand_augment`` is deterministic in (image, seed), runs inside ``tf.data`` maps and
``tf.function`` (graph control flow only: ``tf.while_loop`` / ``tf.cond`` / ``tf.switch_case``)
and never calls back into Python per image. The random draws follow timm's distributions, not
its Python RNG stream.
"""

import tensorflow as tf

from mae_jax.data import augment_affine as geometry
from mae_jax.data import augment_ops as ops
from mae_jax.data.augment_levels import (
    enhance_increasing_level_to_arg,
    enhance_level_to_arg,
    posterize_increasing_level_to_arg,
    posterize_level_to_arg,
    rotate_level_to_arg,
    shear_level_to_arg,
    solarize_add_level_to_arg,
    solarize_increasing_level_to_arg,
    solarize_level_to_arg,
    translate_rel_level_to_arg,
)
from mae_jax.data.randaugment_policy import (  # noqa: F401 - part of this module's API
    GEOMETRIC_OPS,
    MAX_LEVEL,
    RAND_INCREASING_OPS,
    RAND_OPS,
    op_names,
    parse_rand_augment,
)

# ---------------------------------------------------------------------------------------------
# Ops by name, the random draws and the graph that applies them
# ---------------------------------------------------------------------------------------------


def geometric_matrix(name, height, width, level, negate, translate_pct):
    """Affine matrix of a geometric timm op at ``level`` (level_fn then the op's matrix)."""
    if name == "Rotate":
        return geometry.rotation_matrix(rotate_level_to_arg(level, negate), height, width)
    if name == "ShearX":
        return geometry.shear_x_matrix(shear_level_to_arg(level, negate))
    if name == "ShearY":
        return geometry.shear_y_matrix(shear_level_to_arg(level, negate))
    # timm translate_*_rel: pixels = pct * img.size[0] (width) for x, img.size[1] (height) for y.
    pct = translate_rel_level_to_arg(level, negate, translate_pct)
    if name == "TranslateXRel":
        return geometry.translate_x_matrix(pct * tf.cast(width, tf.float64))
    if name == "TranslateYRel":
        return geometry.translate_y_matrix(pct * tf.cast(height, tf.float64))
    raise ValueError(f"{name!r} is not a geometric op")


# Non-geometric timm ops: (the `mae_jax.data.augment_ops` function, its argument from the level
# and the sign draw, or None for ops without one).
PIXEL_OPS = {
    "AutoContrast": ("autocontrast", None),
    "Equalize": ("equalize", None),
    "Invert": ("invert", None),
    "Posterize": ("posterize", lambda level, negate: posterize_level_to_arg(level)),
    "PosterizeIncreasing": ("posterize",
                            lambda level, negate: posterize_increasing_level_to_arg(level)),
    "Solarize": ("solarize", lambda level, negate: solarize_level_to_arg(level)),
    "SolarizeIncreasing": ("solarize",
                           lambda level, negate: solarize_increasing_level_to_arg(level)),
    "SolarizeAdd": ("solarize_add", lambda level, negate: solarize_add_level_to_arg(level)),
    **{name: (name.lower(), lambda level, negate: enhance_level_to_arg(level))
       for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    **{name + "Increasing": (name.lower(), enhance_increasing_level_to_arg)
       for name in ("Color", "Contrast", "Brightness", "Sharpness")},
}


def _pixel_op(name, image, level, negate):
    """A non-geometric timm op at ``level`` (timm's AugmentOp: level_fn then the PIL op)."""
    if name not in PIXEL_OPS:
        known = sorted([*PIXEL_OPS, *GEOMETRIC_OPS])
        raise ValueError(f"unknown RandAugment op {name!r}; known: {known}")
    function, argument = PIXEL_OPS[name]
    if argument is None:
        return getattr(ops, function)(image)
    return getattr(ops, function)(image, argument(level, negate))


# Pixel ops whose TensorFlow kernels run one by one over the image: as one XLA program per op
# and image size they take 0.3-0.7 ms instead of 0.5-1.9 (224 px, one core; the same bits,
# tests below). Invert, Equalize and Sharpness were as fast or faster without XLA.
_COMPILED_PIXEL_OPS = {"AutoContrast", "Posterize", "PosterizeIncreasing", "Solarize",
                       "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing",
                       "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing"}
_xla_pixel_op = tf.function(_pixel_op, jit_compile=True, autograph=False)


def _compiled_pixel_op(name, image, level, negate):
    """`_pixel_op`, as its XLA program for the ops in _COMPILED_PIXEL_OPS."""
    return (_xla_pixel_op if name in _COMPILED_PIXEL_OPS else _pixel_op)(
        name, image, level, negate)


@tf.autograph.experimental.do_not_convert
def apply_op(image, name, level, negate=False, *, fill=geometry.DEFAULT_FILL, translate_pct=0.45):
    """Applies timm op ``name`` (e.g. ``"ShearX"``) at magnitude ``level`` in [0, 10].

    ``negate`` is the ``_randomly_negate`` outcome for signed arguments (ignored by the others).
    """
    image = ops.check_image(image)
    level = ops.to_float64(level)
    negate = tf.convert_to_tensor(negate, tf.bool)
    if name in GEOMETRIC_OPS:
        shape = tf.shape(image)
        matrix = geometric_matrix(name, shape[0], shape[1], level, negate, translate_pct)
        return geometry.affine(image, matrix, fill)
    return _compiled_pixel_op(name, image, level, negate)


def sample_layers(seed, *, num_ops, num_layers=2, magnitude=9, magnitude_std=0.5, prob=0.5):
    """The per-image random choices of timm's RandAugment, from a stateless ``[2]`` seed.

    Returns a dict of ``[num_layers]`` tensors:
      * ``op_index`` int32, uniform over ``num_ops`` with replacement (``np.random.choice``),
      * ``apply`` bool, True with probability ``prob`` (timm skips when ``random() > prob``),
      * ``magnitude`` float64, ``gauss(magnitude, magnitude_std)`` clipped to [0, 10] (the plain
        ``magnitude`` clipped when ``magnitude_std == 0``),
      * ``negate`` bool, True with probability 0.5 (``_randomly_negate``; unsigned ops ignore it).

    ValueError for magnitude_std < 0 or num_layers < 0.
    """
    if magnitude_std < 0:
        raise ValueError(f"magnitude_std must be >= 0, got {magnitude_std}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    shape = [num_layers]
    op_index = tf.random.stateless_uniform(
        shape, seeds[0], minval=0, maxval=num_ops, dtype=tf.int32
    )
    apply = tf.random.stateless_uniform(shape, seeds[1], dtype=tf.float64) <= prob
    level = tf.fill(shape, tf.constant(float(magnitude), tf.float64))
    if magnitude_std > 0:
        noise = tf.random.stateless_normal(shape, seeds[2], dtype=tf.float64)
        level = level + magnitude_std * noise
    level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
    negate = tf.random.stateless_uniform(shape, seeds[3], dtype=tf.float64) > 0.5
    return dict(op_index=op_index, apply=apply, magnitude=level, negate=negate)


@tf.autograph.experimental.do_not_convert
def rand_augment(
    image,
    seed,
    *,
    num_layers=2,
    magnitude=9,
    magnitude_std=0.5,
    increasing=True,
    prob=0.5,
    fill=geometry.DEFAULT_FILL,
    translate_pct=0.45,
):
    """timm RandAugment ``'rand-m9-mstd0.5-inc1'`` (the MAE fine-tuning default) on one image.

    image: uint8 [H, W, 3] tensor (H, W >= 3); seed: int [2] tensor for stateless random ops.
    Returns uint8 [H, W, 3]. Defaults are the official ones (``fill`` = timm's ``img_mean`` for
    the ImageNet mean, bicubic geometry). `parse_rand_augment` turns other timm strings into
    ``num_layers / magnitude / magnitude_std / increasing``. Runs in graph mode (tf.data maps):
    the layers are a ``tf.while_loop`` around one ``tf.switch_case`` whose geometric branch is a
    single `affine` call, so tracing stays cheap.
    """
    image = ops.check_image(image)
    names = op_names(increasing)
    fill = tuple(fill)
    params = sample_layers(
        seed,
        num_ops=len(names),
        num_layers=num_layers,
        magnitude=magnitude,
        magnitude_std=magnitude_std,
        prob=prob,
    )
    geometric = [n for n in names if n in GEOMETRIC_OPS]
    pixel = [n for n in names if n not in GEOMETRIC_OPS]
    # op index -> branch: pixel ops get one branch each, all geometric ops share the last one.
    branch_of_op = tf.constant(
        [pixel.index(n) if n in pixel else len(pixel) for n in names], tf.int32
    )
    geometric_of_op = tf.constant(
        [geometric.index(n) if n in geometric else 0 for n in names], tf.int32
    )
    static_shape = image.shape

    def layer(i, im):
        op = params["op_index"][i]
        level, negate = params["magnitude"][i], params["negate"][i]

        def geometric_branch():
            shape = tf.shape(im)
            matrices = tf.stack(
                [
                    geometric_matrix(n, shape[0], shape[1], level, negate, translate_pct)
                    for n in geometric
                ]
            )
            return geometry.affine(im, tf.gather(matrices, tf.gather(geometric_of_op, op)), fill)

        branches = [lambda n=n: _compiled_pixel_op(n, im, level, negate) for n in pixel]
        branches.append(geometric_branch)
        out = tf.cond(
            params["apply"][i],
            lambda: tf.switch_case(tf.gather(branch_of_op, op), branches),
            lambda: im,
        )
        out.set_shape(static_shape)
        return i + 1, out

    _, image = tf.while_loop(
        lambda i, im: i < num_layers,
        layer,
        (tf.constant(0), image),
        shape_invariants=(tf.TensorShape([]), static_shape),
    )
    image.set_shape(static_shape)
    return image
