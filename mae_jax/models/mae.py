"""Masked Autoencoder (He et al. 2021), numerically equivalent to the official PyTorch model.

One method per idea, as in the official `models_mae.py`: `patchify`, `random_masking`,
`forward_encoder`, `forward_decoder`, `forward_loss`. Images are channels-last float arrays.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models.layers import FixedEmbedding, dense, layer_norm, residual_dtype, token_init
from mae_jax.models.pos_embed import sincos_2d
from mae_jax.models.variants import check_mask_ratio
from mae_jax.models.vit import Block, ViTEncoder


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """images: [N, H, W, C] -> [N, L, P*P*C], feature index (row*P + col)*C + channel."""
    return einops.rearrange(
        images, "n (h p) (w q) c -> n (h w) (p q c)", p=patch_size, q=patch_size
    )


def unpatchify(
    patches: jax.Array, patch_size: int, grid_size: tuple[int, int], channels: int = 3
) -> jax.Array:
    """patches: [N, L, P*P*C] -> images [N, H, W, C] (inverse of `patchify`)."""
    h, w = grid_size
    return einops.rearrange(
        patches, "n (h w) (p q c) -> n (h p) (w q) c", h=h, w=w, p=patch_size, q=patch_size,
        c=channels,
    )


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: int(L * (1 - mask_ratio)), as the official code."""
    check_mask_ratio(mask_ratio)
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps no patch out of {num_patches}: use a smaller ratio."
        )
    return keep


def random_masking(
    tokens: jax.Array, noise: jax.Array, mask_ratio: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample random masking by sorting noise (official `random_masking`).

    tokens: [N, L, D]; noise: [N, L] (small noise = kept).
    Returns kept tokens [N, K, D], mask [N, L] (1 = removed, original order) and
    ids_restore [N, L] (int32) that unshuffles [kept, removed] back to the original order.
    """
    n, length, _ = tokens.shape
    if noise.shape != (n, length):
        raise ValueError(f"noise must have shape [N, L] = {(n, length)}, got {noise.shape}.")
    keep = num_visible(length, mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    ids_keep = ids_shuffle[:, :keep]
    kept = jnp.take_along_axis(tokens, ids_keep[:, :, None], axis=1)
    mask = (ids_restore >= keep).astype(jnp.float32)
    return kept, mask, ids_restore


def removed_patches(noise: jax.Array, mask_ratio: float) -> jax.Array:
    """noise: [N, L] -> [N, L - K] int32: the patches `random_masking` removes (ascending noise)."""
    keep = num_visible(noise.shape[1], mask_ratio)
    return jnp.argsort(noise, axis=1)[:, keep:].astype(jnp.int32)


def reconstruction_loss(
    target: jax.Array, pred: jax.Array, mask: jax.Array, *, norm_pix_loss: bool
) -> jax.Array:
    """target/pred: [N, L, P*P*C]; mask: [N, L] -> mean MSE over removed patches (float32)."""
    target = target.astype(jnp.float32)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1.0e-6)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEDecoder(nnx.Module):
    """Light decoder: embed, fill in the shared mask token, unshuffle, transformer, predict."""

    def __init__(
        self,
        *,
        grid_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        encoder_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        dtype=jnp.float32,
        attention_impl: str | None = "auto",
        rngs: nnx.Rngs,
    ):
        self.grid_size = grid_size
        self.embed = dense(encoder_dim, embed_dim, dtype=dtype, rngs=rngs)
        self.mask_token = nnx.Param(token_init(rngs.params(), (1, 1, embed_dim), jnp.float32))
        table = sincos_2d(embed_dim, grid_size, cls_token=True)
        self.pos_embed = FixedEmbedding(jnp.asarray(table)[None])
        self.blocks = nnx.List(
            [
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    dtype=dtype,
                    attention_impl=attention_impl,
                    rngs=rngs,
                )
                for _ in range(depth)
            ]
        )
        self.norm = layer_norm(embed_dim, dtype=dtype, rngs=rngs)
        self.pred = dense(embed_dim, patch_size * patch_size * in_chans, dtype=dtype, rngs=rngs)

    def __call__(
        self, latent: jax.Array, ids_restore: jax.Array, *, only: jax.Array | None = None
    ) -> jax.Array:
        """latent: [N, 1 + K, D_enc]; ids_restore: [N, L] -> pred [N, L, P*P*C].

        The decoder's residual stream is float32 under mixed precision, as in torch where the
        float32 mask token and position table promote the fp16 embedding.

        only: optional [N, M] patch indices -> pred [N, M, P*P*C] of those patches alone. The
        last block then computes only their rows (attending to every token, so the values
        are the full decoder's to float rounding): the loss needs only the removed patches,
        and skipping the rest of that block is ~3% of the ViT-Tiny MAE step (CPU, measured).
        """
        x = self.embed(latent)
        x = x.astype(residual_dtype(x.dtype))
        n, visible_plus_cls, dim = x.shape
        length = ids_restore.shape[1]
        mask_tokens = jnp.broadcast_to(
            self.mask_token[...].astype(x.dtype), (n, length + 1 - visible_plus_cls, dim)
        )
        patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1], patches], axis=1)
        x = x + self.pos_embed[...]
        if only is None:
            for block in self.blocks:
                x = block(x)
            return self.pred(self.norm(x))[:, 1:]
        rows = only + 1  # after the cls token
        for block in self.blocks[:-1]:
            x = block(x)
        if len(self.blocks):
            x = self.blocks[-1](x, queries=rows)
        else:
            x = jnp.take_along_axis(x, rows[:, :, None], axis=1)
        return self.pred(self.norm(x))


class MAE(nnx.Module):
    """MAE with a ViT encoder that only sees the visible patches.

    Calling the model returns `(loss, pred, mask)` with the official meaning:
    pred [N, L, P*P*C] in patchify order, mask [N, L] with 1 = removed.
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
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        dtype=jnp.float32,
        attention_impl: str | None = "auto",
        rngs: nnx.Rngs,
    ):
        self.norm_pix_loss = norm_pix_loss
        self.encoder = ViTEncoder(
            image_size=image_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dtype=dtype,
            attention_impl=attention_impl,
            rngs=rngs,
        )
        self.decoder = MAEDecoder(
            grid_size=self.encoder.grid_size,
            patch_size=patch_size,
            in_chans=in_chans,
            encoder_dim=embed_dim,
            embed_dim=decoder_embed_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            dtype=dtype,
            attention_impl=attention_impl,
            rngs=rngs,
        )

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    def patchify(self, images: jax.Array) -> jax.Array:
        """images: [N, H, W, C] -> [N, L, P*P*C]."""
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: jax.Array) -> jax.Array:
        """patches: [N, L, P*P*C] -> [N, H, W, C]."""
        return unpatchify(patches, self.patch_size, self.encoder.grid_size, self.encoder.in_chans)

    def make_noise(self, rng: jax.Array, batch_size: int) -> jax.Array:
        """Masking noise ~ U[0, 1): [N, L]."""
        return jax.random.uniform(rng, (batch_size, self.num_patches), jnp.float32)

    def forward_encoder(
        self, images: jax.Array, noise: jax.Array, mask_ratio: float
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """images: [N, H, W, C] -> latent [N, 1 + K, D], mask [N, L], ids_restore [N, L]."""
        tokens = self.encoder.embed(images)
        kept, mask, ids_restore = random_masking(tokens, noise, mask_ratio)
        latent, _ = self.encoder.encode(kept)
        return latent, mask, ids_restore

    def forward_decoder(
        self, latent: jax.Array, ids_restore: jax.Array, *, only: jax.Array | None = None
    ) -> jax.Array:
        """latent: [N, 1 + K, D], ids_restore: [N, L] -> pred [N, L, P*P*C] (with `only`
        [N, M] patch indices: [N, M, P*P*C] of those patches, `MAEDecoder`)."""
        return self.decoder(latent, ids_restore, only=only)

    def forward_loss(self, images: jax.Array, pred: jax.Array, mask: jax.Array) -> jax.Array:
        """Mean squared error on removed patches (per-patch normalised target if configured)."""
        return reconstruction_loss(
            self.patchify(images), pred, mask, norm_pix_loss=self.norm_pix_loss
        )

    def loss(
        self,
        images: jax.Array,
        *,
        noise: jax.Array | None = None,
        rng: jax.Array | None = None,
        mask_ratio: float = 0.75,
    ) -> jax.Array:
        """The training loss alone: `forward`'s loss (to float rounding), with the decoder's
        last block and prediction computed for the removed patches only."""
        noise = self._noise(images, noise, rng, mask_ratio)
        latent, _, ids_restore = self.forward_encoder(images, noise, mask_ratio)
        return self.loss_on(images, latent, ids_restore, removed_patches(noise, mask_ratio))

    def loss_on(self, images: jax.Array, latent: jax.Array, ids_restore: jax.Array,
                removed: jax.Array) -> jax.Array:
        """The decoder's loss on the patches `removed` [N, M] alone (`loss`)."""
        pred = self.forward_decoder(latent, ids_restore, only=removed)
        target = jnp.take_along_axis(self.patchify(images), removed[:, :, None], axis=1)
        every = jnp.ones(removed.shape, jnp.float32)
        return reconstruction_loss(target, pred, every, norm_pix_loss=self.norm_pix_loss)

    def _noise(self, images, noise, rng, mask_ratio) -> jax.Array:
        check_mask_ratio(mask_ratio)
        self.encoder.check_images(images)
        if (noise is None) == (rng is None):
            raise ValueError("Pass exactly one of noise=[N, L] array or rng=PRNG key.")
        return self.make_noise(rng, images.shape[0]) if noise is None else jnp.asarray(noise)

    def forward(
        self,
        images: jax.Array,
        *,
        noise: jax.Array | None = None,
        rng: jax.Array | None = None,
        mask_ratio: float = 0.75,
    ) -> dict[str, jax.Array]:
        """Full forward; returns loss, pred, mask and ids_restore."""
        noise = self._noise(images, noise, rng, mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(images, noise, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(images, pred, mask)
        return {"loss": loss, "pred": pred, "mask": mask, "ids_restore": ids_restore}

    def __call__(
        self,
        images: jax.Array,
        *,
        noise: jax.Array | None = None,
        rng: jax.Array | None = None,
        mask_ratio: float = 0.75,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """images: [N, H, W, C] float -> (loss [], pred [N, L, P*P*C], mask [N, L])."""
        out = self.forward(images, noise=noise, rng=rng, mask_ratio=mask_ratio)
        return out["loss"], out["pred"], out["mask"]
