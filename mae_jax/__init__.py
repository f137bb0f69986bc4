"""mae-jax: Masked Autoencoders in JAX/Flax NNX.

Public API:
    create_mae(name, **overrides)        a named MAE (see VARIANTS)
    create_encoder(name, **overrides)    a named ViT encoder
    load_official(path_or_state_dict)    a ready model from an official PyTorch checkpoint or a
                                         Hugging Face ViTMAE checkpoint
    load_model(path) / load_encoder(path)   a model (or its encoder) from an official file, a
                                         run directory or a Flax export
    export_official(model) / save_official(model, path)   back to the official key layout

Importing the package imports none of these (nor JAX): each is imported when first used, so the
command-line entry points (`mae_jax.core.entry`) restart and reject a bad command line before
JAX, Flax and Orbax load. The subpackages are imported on first use too; a module inside one is
imported as usual (`import mae_jax.models.registry`).
"""

import importlib as _importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from mae_jax.models.mae import MAE, patchify, random_masking, unpatchify
    from mae_jax.models.registry import create_encoder, create_mae
    from mae_jax.models.variants import VARIANTS
    from mae_jax.models.vit import ViTEncoder
    from mae_jax.weights.load import load_encoder, load_model, load_official
    from mae_jax.weights.official import export_official, load_into, save_official

_SUBPACKAGES = ("classification", "core", "data", "models", "pretrain", "reference",
                "segmentation", "visualize", "weights")
_HOMES = {
    "MAE": "mae_jax.models.mae", "patchify": "mae_jax.models.mae",
    "random_masking": "mae_jax.models.mae", "unpatchify": "mae_jax.models.mae",
    "VARIANTS": "mae_jax.models.variants", "create_encoder": "mae_jax.models.registry",
    "create_mae": "mae_jax.models.registry", "ViTEncoder": "mae_jax.models.vit",
    "load_encoder": "mae_jax.weights.load", "load_model": "mae_jax.weights.load",
    "load_official": "mae_jax.weights.load", "export_official": "mae_jax.weights.official",
    "load_into": "mae_jax.weights.official", "save_official": "mae_jax.weights.official",
}

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


def __getattr__(name):
    """A public name from its home module, or a subpackage, imported on first use."""
    if name in _HOMES:
        value = getattr(_importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | set(_SUBPACKAGES))
