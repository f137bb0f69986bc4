"""The named MAE / ViT sizes (official ones, and the demos' micro size): plain data, no JAX, so
configs and their command-line checks load without it. Constructors: `mae_jax.models.registry`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int


VARIANTS: dict[str, Variant] = {
    "vit_tiny_patch16": Variant(192, 12, 3, 16),
    "vit_small_patch16": Variant(384, 12, 6, 16),
    "vit_base_patch16": Variant(768, 12, 12, 16),
    "vit_large_patch16": Variant(1024, 24, 16, 16),
    "vit_huge_patch14": Variant(1280, 32, 16, 14),
    "vit_huge_patch16": Variant(1280, 32, 16, 16),
    # Not an official size: the offline demos (configs/demo.py, configs/seg_demo.py) use it.
    "vit_micro_patch4": Variant(64, 4, 4, 4),
}

# The official decoder (the paper's default): width 512, depth 8, 16 heads.
DEFAULT_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"Unknown model variant {name!r}; known: {', '.join(VARIANTS)}.")
    return VARIANTS[name]


def find_variant(*, embed_dim: int, depth: int, patch_size: int) -> str | None:
    """The registry name of an encoder of these dimensions, if it is a named one."""
    for name, variant in VARIANTS.items():
        if (variant.embed_dim, variant.depth, variant.patch_size) == (
            embed_dim,
            depth,
            patch_size,
        ):
            return name
    return None


def check_mask_ratio(mask_ratio: float) -> None:
    """The fraction of patches removed: a float in (0, 1) (here so that configs check it
    without JAX)."""
    if not isinstance(mask_ratio, int | float) or not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(
            f"mask_ratio must be a Python float strictly between 0 and 1, got {mask_ratio!r}"
            + (" (under jit, pass it as a static argument: static_argnames=('mask_ratio',))."
               if hasattr(mask_ratio, "aval") else ".")
        )
