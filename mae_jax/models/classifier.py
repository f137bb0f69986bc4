"""The official MAE classifier (`models_vit.VisionTransformer`): a ViT encoder and a linear head.

Two heads, as the official scripts build them:
  * fine-tuning (`main_finetune.py`, global_pool=True): the mean of the patch tokens after the
    last block, `fc_norm` (LayerNorm eps 1e-6), `head` Linear (weights N(0, 2e-5)); the encoder's
    final `norm` is deleted (`del self.norm`), drop path is on during training;
  * linear probing (`main_linprobe.py`, global_pool=False): the cls token after the final
    `norm`, then `head_norm` BatchNorm1d(affine=False, eps 1e-6) and `head` Linear (weights
    N(0, 0.01)); only the head is trained.

Attribute names follow the official keys (`encoder.*` are the root keys of the official file,
`fc_norm.*`, `head.*`) so exports line up. timm's `trunc_normal_(w, std=s)` truncates at +-2 in
absolute units, i.e. +-2/s standard deviations: for s = 0.01 or 2e-5 that is a plain normal, so
the head uses one (JAX's truncated_normal truncates at 2 standard deviations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models.layers import LAYER_NORM_EPS, BatchNorm, layer_norm
from mae_jax.models.registry import get_variant
from mae_jax.models.vit import ViTEncoder

FINETUNE_HEAD_STD = 2e-5  # main_finetune.py: trunc_normal_(model.head.weight, std=2e-5)
PROBE_HEAD_STD = 0.01  # main_linprobe.py: trunc_normal_(model.head.weight, std=0.01) (MoCo v3)
# torch BatchNorm1d's default momentum 0.1 is flax's 0.9 (running = 0.9 * running + 0.1 * batch).
PROBE_NORM_MOMENTUM = 0.9


class ViTClassifier(nnx.Module):
    """images [N, H, W, 3] (normalised) -> logits [N, num_classes] (float32).

    global_pool=True: the fine-tuning classifier; False: the linear probe (BatchNorm head).
    `encoder_overrides` set encoder sizes beyond the variant's (patch_size, embed_dim, ...).
    """

    def __init__(
        self,
        *,
        variant: str = "vit_base_patch16",
        image_size: int = 224,
        num_classes: int = 1000,
        global_pool: bool = True,
        drop_path_rate: float = 0.0,
        head_init_std: float | None = None,
        dtype=jnp.float32,
        attention_impl: str | None = "auto",
        rngs: nnx.Rngs,
        **encoder_overrides,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.encoder = ViTEncoder(
            image_size=image_size,
            drop_path_rate=drop_path_rate,
            # timm's VisionTransformer trains its position embedding (MAE pretraining does not).
            trainable_pos_embed=True,
            dtype=dtype,
            attention_impl=attention_impl,
            rngs=rngs,
            **(dict(vars(get_variant(variant))) | encoder_overrides),
        )
        dim = self.encoder.embed_dim
        if global_pool:
            self.encoder.norm = None  # models_vit: `del self.norm`; fc_norm follows the pool
            self.fc_norm = layer_norm(dim, dtype=dtype, rngs=rngs)
            self.head_norm = None
            std = FINETUNE_HEAD_STD if head_init_std is None else head_init_std
        else:
            self.fc_norm = None
            # BatchNorm1d's running statistics (unbiased running variance), in float32.
            self.head_norm = BatchNorm(
                dim, use_bias=False, use_scale=False, epsilon=LAYER_NORM_EPS,
                momentum=PROBE_NORM_MOMENTUM, dtype=jnp.float32, rngs=rngs,
            )
            std = PROBE_HEAD_STD if head_init_std is None else head_init_std
        self.head = nnx.Linear(
            dim, num_classes, kernel_init=nnx.initializers.normal(stddev=std),
            bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=jnp.float32,
            rngs=rngs,
        )

    def features(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """images [N, H, W, 3] -> pooled features [N, D] (before `head_norm` / `head`).

        global_pool: fc_norm(mean of the patch tokens); else the cls token after `norm`.
        `rngs` (a "dropout" stream) turns drop path on.
        """
        tokens, _ = self.encoder.encode(
            self.encoder.embed(images), apply_norm=not self.global_pool, rngs=rngs
        )
        if self.global_pool:
            return self.fc_norm(tokens[:, 1:].mean(axis=1))
        return tokens[:, 0]

    def __call__(
        self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """train=True: drop path (randomness from `rngs`, a "dropout" stream) and BatchNorm batch
        statistics (updated in place); False: neither, running statistics."""
        if train and rngs is None and self.global_pool:
            raise ValueError("Training the fine-tuning classifier needs rngs (drop path).")
        features = self.features(images, rngs=rngs if train else None)
        if self.head_norm is not None:
            features = self.head_norm(features.astype(jnp.float32),
                                      use_running_average=not train)
        return self.head(features).astype(jnp.float32)

