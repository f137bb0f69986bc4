"""RandAugment's per-example draws, encoded for the accelerators (TensorFlow, on the host).

`layer_program` makes the random choices of `mae_jax.data.randaugment.rand_augment` from the
same seed with the same ops (`sample_layers`), maps each chosen op's level to its argument in
float64 as timm does, and returns them as the op codes and float32 arguments that
`mae_jax.data.randaugment_device.apply_layers` runs on the devices after the device resize. The
images therefore follow the host path's draws exactly; only the pixel arithmetic moves.
"""

import tensorflow as tf

from mae_jax.data import randaugment as ra
from mae_jax.data import tf_runtime  # noqa: F401 - sets TF up
from mae_jax.data.randaugment_device import CODE, IDENTITY_MATRIX, NUM_ARGS


def _encode(name, size, level, negate, translate_pct):
    """(code, float64 [NUM_ARGS] arguments) of timm op `name` on a size x size image."""
    if name in ra.GEOMETRIC_OPS:
        return tf.constant(CODE["affine"]), ra.geometric_matrix(name, size, size, level, negate,
                                                                translate_pct)
    function, argument = ra.PIXEL_OPS[name]
    args = tf.zeros([NUM_ARGS], tf.float64)
    if argument is not None:
        value = tf.cast(argument(level, negate), tf.float64)
        args = tf.concat([value[None], args[1:]], 0)
    return tf.constant(CODE[function]), args


@tf.autograph.experimental.do_not_convert
def layer_program(seed, size: int, *, num_layers=2, magnitude=9, magnitude_std=0.5,
                  increasing=True, prob=0.5, translate_pct=0.45) -> dict[str, tf.Tensor]:
    """{"ra_code": int32 [num_layers], "ra_args": float32 [num_layers, NUM_ARGS]} for the
    size x size image that `rand_augment(image, seed, ...)` would augment (same keyword
    arguments; `parse_rand_augment` reads them from a timm string). Skipped layers get the
    identity code."""
    names = ra.op_names(increasing)
    params = ra.sample_layers(seed, num_ops=len(names), num_layers=num_layers,
                              magnitude=magnitude, magnitude_std=magnitude_std, prob=prob)
    codes, args = [], []
    for layer in range(num_layers):
        level, negate = params["magnitude"][layer], params["negate"][layer]
        # Only the chosen op's arguments are computed (all 15: ~7% more host time an image).
        code, value = tf.switch_case(params["op_index"][layer], [
            lambda name=name, level=level, negate=negate: _encode(
                name, size, level, negate, translate_pct)
            for name in names])
        codes.append(tf.where(params["apply"][layer], code, CODE["identity"]))
        args.append(value)
    if not num_layers:
        return identity_program(0)
    return {"ra_code": tf.stack(codes), "ra_args": tf.cast(tf.stack(args), tf.float32)}


def identity_program(num_layers: int) -> dict[str, tf.Tensor]:
    """The program of an image left as it is (slots of undecodable files)."""
    return {"ra_code": tf.fill([num_layers], CODE["identity"]),
            "ra_args": tf.tile(tf.constant([IDENTITY_MATRIX], tf.float32), [num_layers, 1])}
