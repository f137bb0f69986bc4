"""mae-jax: Masked Autoencoders in JAX/Flax NNX.

Public API:
    create_mae(name, **overrides)        a named MAE (see VARIANTS)
    create_encoder(name, **overrides)    a named ViT encoder
    load_official(path_or_state_dict)    a ready model from an official PyTorch checkpoint or a
                                         Hugging Face ViTMAE checkpoint
    load_model(path) / load_encoder(path)   a model (or its encoder) from an official file, a
                                         run directory or a Flax export
    export_official(model) / save_official(model, path)   back to the official key layout
"""

from mae_jax.models.mae import MAE, patchify, random_masking, unpatchify
from mae_jax.models.registry import VARIANTS, create_encoder, create_mae
from mae_jax.models.vit import ViTEncoder
from mae_jax.weights.load import load_encoder, load_model, load_official
from mae_jax.weights.official import export_official, load_into, save_official

__all__ = [
    "MAE",
    "VARIANTS",
    "ViTEncoder",
    "create_encoder",
    "create_mae",
    "export_official",
    "load_encoder",
    "load_into",
    "load_model",
    "load_official",
    "patchify",
    "random_masking",
    "save_official",
    "unpatchify",
]
