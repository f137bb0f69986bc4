"""ViT (MAE) backbone + multi-scale neck + UPerNet and auxiliary FCN heads (mmseg's recipe)."""

from __future__ import annotations

from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models.registry import get_variant
from mae_jax.models.upernet import UPerNetHeads
from mae_jax.models.vit import ViTEncoder


class MAESegmenter(nnx.Module):
    """images [N, H, W, 3] -> (logits [N, H/4, W/4, K], auxiliary logits [N, H/16, W/16, K]).

    The backbone is the MAE encoder with trainable position embeddings (interpolated to the
    input grid when weights are loaded), stochastic depth growing linearly to
    `drop_path_rate`, optional layer scale (mmseg: init 1.0) and BEiT-style relative position
    bias (mmseg: zero-initialised), and features taken from `out_indices` before any final norm.
    """

    def __init__(
        self,
        *,
        variant: str = "vit_base_patch16",
        image_size: int = 512,
        num_classes: int = 150,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        drop_path_rate: float = 0.1,
        layer_scale_init: float | None = 1.0,
        relative_position_bias: bool = True,
        channels: int = 768,
        aux_channels: int = 256,
        dropout: float = 0.1,
        dtype=jnp.float32,
        attention_impl: str | None = "auto",
        rngs: nnx.Rngs,
        **encoder_overrides,
    ):
        if len(out_indices) != 4:
            raise ValueError(f"UPerNet needs 4 backbone levels, got out_indices={out_indices}.")
        variant_kwargs = dict(vars(get_variant(variant))) | encoder_overrides
        self.out_indices = tuple(out_indices)
        self.backbone = ViTEncoder(
            image_size=image_size,
            drop_path_rate=drop_path_rate,
            layer_scale_init=layer_scale_init,
            trainable_pos_embed=True,
            relative_position_bias=relative_position_bias,
            dtype=dtype,
            attention_impl=attention_impl,
            rngs=rngs,
            **variant_kwargs,
        )
        for index in self.out_indices:
            if not 0 <= index < self.backbone.depth:
                raise ValueError(
                    f"out_indices {self.out_indices} must lie in [0, {self.backbone.depth})."
                )
        self.heads = UPerNetHeads(
            embed_dim=self.backbone.embed_dim,
            channels=channels,
            aux_channels=aux_channels,
            num_classes=num_classes,
            dropout=dropout,
            dtype=dtype,
            rngs=rngs,
        )

    def features(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> list[jax.Array]:
        """images [N, H, W, 3] -> 4 maps [N, H/P, W/P, D] from the chosen blocks."""
        out = self.backbone(
            images, apply_norm=False, return_blocks=self.out_indices, rngs=rngs
        )
        height, width = self.backbone.grid_size
        return [
            einops.rearrange(x, "n (h w) d -> n h w d", h=height, w=width) for x in out["blocks"]
        ]

    def __call__(
        self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """train=True: drop path, dropout (randomness from `rngs`, a "dropout" stream) and
        batch statistics; False (evaluation): none of them, running statistics."""
        if train and rngs is None:
            raise ValueError("Training mode needs rngs with a 'dropout' stream.")
        rngs = rngs if train else None
        return self.heads(self.features(images, rngs=rngs), train=train, rngs=rngs)
