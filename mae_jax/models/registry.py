"""Constructors of the named MAE / ViT variants (`mae_jax.models.variants`)."""

from __future__ import annotations

import dataclasses

from flax import nnx

from mae_jax.models.layers import make_rngs
from mae_jax.models.mae import MAE
from mae_jax.models.variants import (  # noqa: F401 - re-exported
    DEFAULT_DECODER,
    VARIANTS,
    Variant,
    find_variant,
    get_variant,
)
from mae_jax.models.vit import ViTEncoder


def create_mae(name: str, *, rngs: nnx.Rngs | None = None, **overrides) -> MAE:
    """A named MAE; `overrides` set any MAE argument (image_size, decoder_depth, dtype, ...)."""
    variant = get_variant(name)
    kwargs = dataclasses.asdict(variant) | DEFAULT_DECODER | overrides
    return MAE(**kwargs, rngs=rngs or make_rngs(0))


def create_encoder(name: str, *, rngs: nnx.Rngs | None = None, **overrides) -> ViTEncoder:
    """A named ViT encoder alone (for segmentation / probing)."""
    kwargs = dataclasses.asdict(get_variant(name)) | overrides
    return ViTEncoder(**kwargs, rngs=rngs or make_rngs(0))
