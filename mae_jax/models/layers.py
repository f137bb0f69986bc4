"""Layers shared by the ViT, MAE decoder and heads: the official initialisation and LayerNorm."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

LAYER_NORM_EPS = 1e-6

# xavier_uniform, as the official `_init_weights` applies to every Linear (fans from [in, out]).
xavier_uniform = nnx.initializers.xavier_uniform()
# The official code initialises the patch-embed conv as a Linear on its [D, 3*P*P] view.
patch_embed_init = nnx.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1
)
token_init = nnx.initializers.normal(stddev=0.02)


class FixedEmbedding(nnx.Variable):
    """A position table that is not trained (not an `nnx.Param`, so no optimizer state)."""


def dense(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=xavier_uniform,
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def layer_norm(features: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        features, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )
