"""ViT building blocks (timm / official MAE layout) and an encoder that runs on any token subset."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models.attention import Attention
from mae_jax.models.layers import (
    FixedEmbedding,
    dense,
    layer_norm,
    patch_embed_init,
    residual_dtype,
    token_init,
    torch_bias_init,
)
from mae_jax.models.pos_embed import sincos_2d


@jax.checkpoint
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU in torch's CPU / CUDA formula, x / 2 * (1 + erf(x / sqrt(2))),
    recomputed from its input in the backward pass.

    `jax.nn.gelu(approximate=False)` takes erfc(-x / sqrt(2)) instead: within float32 rounding
    of this, but ~2x its time on the CPU for the [N, T, 4D] activation (measured; ViT-Tiny MAE
    forward + backward -1.1% with this form). Autodiff would store erf / exp intermediates of
    that hidden layer for the backward pass; recomputing them (elementwise, fused) is cheaper.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))


class Mlp(nnx.Module):
    def __init__(self, *, dim: int, hidden_dim: int, dtype, rngs: nnx.Rngs):
        self.fc1 = dense(dim, hidden_dim, dtype=dtype, rngs=rngs)
        self.fc2 = dense(hidden_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, T, D] -> [N, T, D]."""
        return self.fc2(gelu(self.fc1(x)))


class DropPath(nnx.Module):
    """Stochastic depth per sample, active only when the call gets `rngs` (a "dropout" stream)."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.rate == 0.0 or rngs is None:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep_mask = jax.random.bernoulli(rngs.dropout(), keep, shape)
        return jnp.where(keep_mask, x / keep, 0).astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block (timm); optional layer scale and drop path (BEiT/mmseg)."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dtype=jnp.float32,
        attention_impl: str | None = "auto",
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        relative_grid: tuple[int, int] | None = None,
        rngs: nnx.Rngs,
    ):
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn = Attention(
            dim=dim,
            num_heads=num_heads,
            dtype=dtype,
            attention_impl=attention_impl,
            relative_grid=relative_grid,
            rngs=rngs,
        )
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        self.drop_path = DropPath(drop_path)
        if layer_scale_init is not None:
            self.gamma_1 = nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32))
            self.gamma_2 = nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32))
        else:
            self.gamma_1 = self.gamma_2 = None

    def __call__(
        self,
        x: jax.Array,
        *,
        attention_bias: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        queries: jax.Array | None = None,
    ) -> jax.Array:
        """x: [N, T, D] -> [N, T, D]; `rngs` (a "dropout" stream) turns drop path on.

        The residual stream keeps x's dtype (float32 under mixed precision): the branch
        outputs (compute dtype) are promoted before layer scale, drop path and the add.
        queries: optional [N, M] token indices: the block computes only those rows (attending
        to all T tokens) and returns [N, M, D].
        """
        h = self.attn(self.norm1(x), bias=attention_bias, queries=queries)
        if queries is not None:
            x = jnp.take_along_axis(x, queries[:, :, None], axis=1)
        x = x + self.drop_path(_scaled(h, self.gamma_1, x.dtype), rngs=rngs)
        h = self.mlp(self.norm2(x))
        return x + self.drop_path(_scaled(h, self.gamma_2, x.dtype), rngs=rngs)


def _scaled(h: jax.Array, gamma: nnx.Param | None, dtype) -> jax.Array:
    """A branch output in the residual dtype, times the float32 layer scale if any."""
    h = h.astype(dtype)
    return h if gamma is None else h * gamma[...].astype(dtype)


class PatchEmbed(nnx.Module):
    """P x P convolution with stride P: [N, H, W, C] -> [N, (H/P)*(W/P), D] (row-major)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int, dtype, rngs):
        self.proj = nnx.Conv(
            in_chans,
            embed_dim,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            kernel_init=patch_embed_init,
            # The official code leaves the conv bias at PyTorch's default init.
            bias_init=torch_bias_init(in_chans * patch_size * patch_size),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.proj(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def check_image_size(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        raise ValueError(
            f"Image size {height}x{width} is not a positive multiple of the patch size "
            f"{patch_size}: choose a size divisible by {patch_size} (e.g. "
            f"{max(1, round(height / patch_size)) * patch_size})."
        )
    return int(height), int(width)


class ViTEncoder(nnx.Module):
    """The MAE / ViT encoder; attribute names mirror the official checkpoint keys.

    The encoder is position-aware before any masking (`embed`), so MAE can drop tokens in
    between; `encode` runs the transformer on whatever tokens it is given (plus cls).
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dtype=jnp.float32,
        attention_impl: str | None = "auto",
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = None,
        trainable_pos_embed: bool = False,
        relative_position_bias: bool = False,
        rngs: nnx.Rngs,
    ):
        self.image_size = check_image_size(image_size, patch_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.grid_size = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = PatchEmbed(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, dtype=dtype, rngs=rngs
        )
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, embed_dim), jnp.float32))
        table = jnp.asarray(sincos_2d(embed_dim, self.grid_size, cls_token=True))[None]
        self.pos_embed = (nnx.Param if trainable_pos_embed else FixedEmbedding)(table)
        # Stochastic depth grows linearly over the blocks (timm / mmseg).
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nnx.List(
            [
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    dtype=dtype,
                    attention_impl=attention_impl,
                    drop_path=rates[i],
                    layer_scale_init=layer_scale_init,
                    relative_grid=self.grid_size if relative_position_bias else None,
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )
        self.norm = layer_norm(embed_dim, dtype=dtype, rngs=rngs)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def check_images(self, images: jax.Array) -> None:
        if not jnp.issubdtype(images.dtype, jnp.floating):  # QA: raw pixels gave loss 20910
            raise TypeError(
                f"Expected float images, normalised with the ImageNet mean and std, got "
                f"{images.dtype}: mae_jax.data.constants.normalize_uint8 turns uint8 pixels "
                "into the model's input.")
        expected = (*self.image_size, self.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected or not images.shape[0]:
            raise ValueError(
                f"Expected images of shape [N, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(float, channels-last), got {tuple(images.shape)}. Resize the images, or build "
                f"the model with image_size=(H, W) / in_chans matching them."
            )

    def embed(self, images: jax.Array) -> jax.Array:
        """images: [N, H, W, C] -> patch tokens with position embedding [N, L, D].

        The conv runs in the compute dtype; adding the float32 table gives the float32
        residual stream (torch's promotion of fp16 + fp32 under autocast).
        """
        self.check_images(images)
        x = self.patch_embed(images)
        return x.astype(residual_dtype(x.dtype)) + self.pos_embed[...][:, 1:]

    def encode(
        self,
        tokens: jax.Array,
        *,
        apply_norm: bool = True,
        return_blocks: Sequence[int] = (),
        attention_bias_fn=None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, list[jax.Array]]:
        """tokens: [N, K, D] (any subset of `embed`'s output) -> ([N, 1 + K, D], block outputs).

        The cls token (with its zero position) is prepended here, after any masking.
        `return_blocks` lists block indices whose outputs ([N, 1 + K, D], before any final
        norm) are returned, in that order. `rngs` (a "dropout" stream) turns drop path on.
        """
        tokens = tokens.astype(residual_dtype(tokens.dtype))
        cls = self.cls_token[...] + self.pos_embed[...][:, :1]
        cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        x = jnp.concatenate([cls, tokens], axis=1)
        for index in return_blocks:
            if not -self.depth <= index < self.depth:
                raise ValueError(f"Block index {index} out of range for depth {self.depth}.")
        wanted = {index % self.depth for index in return_blocks}
        outputs = {}
        bias = attention_bias_fn() if attention_bias_fn is not None else None
        for index, block in enumerate(self.blocks):
            x = block(x, attention_bias=bias, rngs=rngs)
            if index in wanted:
                outputs[index] = x
        if apply_norm:
            if self.norm is None:
                raise ValueError(
                    "This encoder has no final norm (it comes from a fine-tuned classifier, whose "
                    "global pooling deletes it): call it with apply_norm=False, or load the "
                    "whole classifier (mae_jax.classification.transfer.load_official_classifier)."
                )
            x = self.norm(x)
        return x, [outputs[index % self.depth] for index in return_blocks]

    def __call__(
        self,
        images: jax.Array,
        *,
        apply_norm: bool = True,
        return_blocks: Sequence[int] = (),
        rngs: nnx.Rngs | None = None,
    ) -> dict[str, jax.Array | list[jax.Array]]:
        """Encoder-only forward on all patches.

        images: [N, H, W, C] -> {"cls": [N, D], "patches": [N, L, D],
        "blocks": list of [N, L, D] patch tokens of the chosen blocks (before the final norm)}.
        `rngs` (a "dropout" stream) turns drop path on; without it the forward is deterministic.
        """
        x, block_outputs = self.encode(
            self.embed(images), apply_norm=apply_norm, return_blocks=return_blocks, rngs=rngs
        )
        return {
            "cls": x[:, 0],
            "patches": x[:, 1:],
            "blocks": [out[:, 1:] for out in block_outputs],
        }
