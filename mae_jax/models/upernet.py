"""UPerNet segmentation head on ViT features (mmsegmentation's MAE + UPerNet config), NHWC.

Pieces, as in mmseg: `MultiScaleNeck` (mmseg's `Feature2Pyramid`) turns four 1/16 ViT maps into
1/4, 1/8, 1/16 and 1/32 maps; `UPerHead` (pyramid pooling + FPN) predicts logits at 1/4;
`FCNHead` is the auxiliary head on level 2. `UPerNetHeads` bundles the three.

Train/eval is an argument of every call, not module state: `train=True` uses batch statistics
(and updates the running ones) and live dropout, whose randomness comes from the `rngs` passed
to the same call (a "dropout" stream); `train=False` uses running statistics and no dropout.

Batch norm is global across devices without an `axis_name`: inside a jitted step over a batch
sharded on the data axis, the batch mean is an ordinary reduction over the whole (global) array
and GSPMD inserts the cross-device sum, which is what mmseg's SyncBN computes. Its running
variance takes the unbiased batch variance, as PyTorch's (`layers.BatchNorm`).

Mixed precision: convolutions run in the compute `dtype`; BatchNorm statistics and the loss are
float32 (torch autocast + mmseg's `force_fp32` loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mae_jax.models.convolution import Conv, PatchDeconv
from mae_jax.models.layers import BatchNorm, torch_bias_init
from mae_jax.models.resize import adaptive_avg_pool2d, resize_bilinear
from mae_jax.models.vit import gelu

# mmcv's ConvModule initialises convs with kaiming normal (fan_out, relu).
kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default ConvTranspose2d weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))
# with torch's fan_in of a transposed conv, weight.size(1) * kh * kw = out_channels * kh * kw
# (Flax's ConvTranspose kernel is [kh, kw, in, out], so the "in" axis for the fan is the last).
torch_deconv_init = nnx.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
)
# mmseg's decode heads initialise the classifier (`conv_seg`) with N(0, 0.01), bias 0.
classifier_init = nnx.initializers.normal(stddev=0.01)


def batch_norm(features: int, *, dtype, rngs: nnx.Rngs) -> BatchNorm:
    """mmcv's BN / SyncBN: eps 1e-5, torch momentum 0.1 (== Flax momentum 0.9)."""
    return BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class ConvBNReLU(nnx.Module):
    """mmcv's ConvModule: conv (no bias, 'same' padding) -> BatchNorm -> ReLU."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            padding=kernel_size // 2,
            use_bias=False,
            kernel_init=kaiming_fan_out,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.bn = batch_norm(out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, H, W, in_channels] -> [B, H, W, out_channels]."""
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


def _deconv2x(dim: int, *, dtype, rngs: nnx.Rngs) -> PatchDeconv:
    return PatchDeconv(
        dim,
        dim,
        (2, 2),
        strides=(2, 2),
        padding="VALID",
        kernel_init=torch_deconv_init,
        bias_init=torch_bias_init(dim * 2 * 2),  # torch's default: fan_in = out_channels*kh*kw
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class MultiScaleNeck(nnx.Module):
    """mmseg's `Feature2Pyramid` (rescales 4, 2, 1, 0.5) for a plain ViT."""

    def __init__(self, *, embed_dim: int, dtype=jnp.float32, rngs: nnx.Rngs):
        self.up4_deconv1 = _deconv2x(embed_dim, dtype=dtype, rngs=rngs)
        self.up4_norm = batch_norm(embed_dim, dtype=dtype, rngs=rngs)
        self.up4_deconv2 = _deconv2x(embed_dim, dtype=dtype, rngs=rngs)
        self.up2_deconv = _deconv2x(embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, features: Sequence[jax.Array], *, train: bool) -> list[jax.Array]:
        """features: 4 x [B, h, w, D] -> [B, 4h, 4w, D], [B, 2h, 2w, D], [B, h, w, D],
        [B, h/2, w/2, D] (floor, as MaxPool2d(2))."""
        if len(features) != 4:
            raise ValueError(f"MultiScaleNeck needs 4 feature maps, got {len(features)}")
        x4 = self.up4_norm(self.up4_deconv1(features[0]), use_running_average=not train)
        x4 = gelu(x4)  # torch's nn.GELU() formula, as mmseg's neck
        x4 = self.up4_deconv2(x4)
        x2 = self.up2_deconv(features[1])
        half = nnx.max_pool(features[3], window_shape=(2, 2), strides=(2, 2), padding="VALID")
        return [x4, x2, features[2], half]


class PyramidPoolingModule(nnx.Module):
    """PSPNet's PPM: adaptive average pools, 1x1 ConvBNReLU each, upsampled back."""

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        pool_scales: Sequence[int],
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.pool_scales = tuple(pool_scales)
        conv = partial(ConvBNReLU, in_channels=in_channels, out_channels=channels, dtype=dtype)
        self.convs = nnx.List([conv(kernel_size=1, rngs=rngs) for _ in self.pool_scales])

    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        """x: [B, H, W, in_channels] -> one [B, H, W, channels] per pool scale."""
        size = x.shape[1:3]
        return [
            resize_bilinear(conv(adaptive_avg_pool2d(x, scale), train=train), size)
            for scale, conv in zip(self.pool_scales, self.convs, strict=True)
        ]


class ClassifierHead(nnx.Module):
    """mmseg's `cls_seg`: Dropout2d (whole channels) then a 1x1 conv with bias."""

    def __init__(self, *, channels: int, num_classes: int, dropout: float, dtype, rngs: nnx.Rngs):
        # NHWC: broadcasting the mask over H and W drops whole channels, like nn.Dropout2d.
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2))
        self.conv_seg = Conv(
            channels,
            num_classes,
            (1, 1),
            kernel_init=classifier_init,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        return self.conv_seg(self.dropout(x, deterministic=not train, rngs=rngs))


class UPerHead(nnx.Module):
    """UPerNet decode head (mmseg's `UPerHead`): PPM on the last level + FPN, logits at level 0."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int] = (768,) * 4,
        channels: int = 768,
        num_classes: int = 150,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_channels = tuple(in_channels)
        conv = partial(ConvBNReLU, out_channels=channels, dtype=dtype, rngs=rngs)
        self.psp_modules = PyramidPoolingModule(
            in_channels=in_channels[-1],
            channels=channels,
            pool_scales=pool_scales,
            dtype=dtype,
            rngs=rngs,
        )
        bottleneck_in = in_channels[-1] + len(pool_scales) * channels
        self.bottleneck = conv(in_channels=bottleneck_in, kernel_size=3)
        self.lateral_convs = nnx.List(
            [conv(in_channels=c, kernel_size=1) for c in in_channels[:-1]]
        )
        self.fpn_convs = nnx.List(
            [conv(in_channels=channels, kernel_size=3) for _ in in_channels[:-1]]
        )
        self.fpn_bottleneck = conv(in_channels=len(in_channels) * channels, kernel_size=3)
        self.classifier = ClassifierHead(
            channels=channels, num_classes=num_classes, dropout=dropout, dtype=dtype, rngs=rngs
        )

    def __call__(
        self, features: Sequence[jax.Array], *, train: bool, rngs: nnx.Rngs | None
    ) -> jax.Array:
        """features: [B, H_i, W_i, in_channels[i]], finest first -> logits [B, H_0, W_0, K]."""
        if len(features) != len(self.lateral_convs) + 1:
            raise ValueError(
                f"UPerHead was built for {len(self.lateral_convs) + 1} levels, got {len(features)}"
            )
        top = features[-1]
        pooled = self.psp_modules(top, train=train)
        top = self.bottleneck(jnp.concatenate([top, *pooled], axis=-1), train=train)
        laterals = [
            conv(x, train=train) for conv, x in zip(self.lateral_convs, features, strict=False)
        ]
        laterals.append(top)
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse maps added into finer ones
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(
                laterals[i], laterals[i - 1].shape[1:3]
            )
        outs = [conv(x, train=train) for conv, x in zip(self.fpn_convs, laterals, strict=False)]
        outs.append(laterals[-1])
        size = outs[0].shape[1:3]
        outs = [outs[0]] + [resize_bilinear(x, size) for x in outs[1:]]
        fused = self.fpn_bottleneck(jnp.concatenate(outs, axis=-1), train=train)
        return self.classifier(fused, train=train, rngs=rngs)


class FCNHead(nnx.Module):
    """mmseg's FCNHead as the auxiliary head: one 3x3 ConvBNReLU (concat_input False)."""

    def __init__(
        self,
        *,
        in_channels: int = 768,
        channels: int = 256,
        num_classes: int = 150,
        dropout: float = 0.1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = ConvBNReLU(
            in_channels=in_channels, out_channels=channels, kernel_size=3, dtype=dtype, rngs=rngs
        )
        self.classifier = ClassifierHead(
            channels=channels, num_classes=num_classes, dropout=dropout, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        """x: [B, H, W, in_channels] -> logits [B, H, W, num_classes]."""
        return self.classifier(self.conv(x, train=train), train=train, rngs=rngs)


class UPerNetHeads(nnx.Module):
    """Neck + UPerHead + auxiliary FCNHead (on neck level `aux_level`), as mmseg's MAE config."""

    def __init__(
        self,
        *,
        embed_dim: int = 768,
        channels: int = 768,
        aux_channels: int = 256,
        num_classes: int = 150,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_level: int = 2,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.aux_level = aux_level
        self.neck = MultiScaleNeck(embed_dim=embed_dim, dtype=dtype, rngs=rngs)
        self.decode_head = UPerHead(
            in_channels=(embed_dim,) * 4,
            channels=channels,
            num_classes=num_classes,
            pool_scales=pool_scales,
            dropout=dropout,
            dtype=dtype,
            rngs=rngs,
        )
        self.auxiliary_head = FCNHead(
            in_channels=embed_dim,
            channels=aux_channels,
            num_classes=num_classes,
            dropout=dropout,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(
        self, features: Sequence[jax.Array], *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """features: 4 x [B, h, w, D] ViT maps at 1/16 ->
        (logits [B, 4h, 4w, K] at 1/4, auxiliary logits [B, h, w, K] at 1/16).

        train: batch statistics and dropout (needs `rngs` with a "dropout" stream when the
        dropout rate is positive); False: running statistics, no dropout.
        """
        pyramid = self.neck(features, train=train)
        logits = self.decode_head(pyramid, train=train, rngs=rngs)
        return logits, self.auxiliary_head(pyramid[self.aux_level], train=train, rngs=rngs)


def segmentation_loss(
    logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255, avg_non_ignore: bool = False
) -> jax.Array:
    """logits: [B, h, w, K] (any resolution), labels: [B, H, W] integer (uint8 from the input
    pipeline) -> scalar cross-entropy.

    Logits are resized bilinearly (align_corners False) to the label size first. Pixels equal
    to `ignore_index` contribute 0. mmseg's CrossEntropyLoss (avg_non_ignore=False, the MAE
    config) then averages over ALL pixels; `avg_non_ignore=True` averages over the valid pixels
    only, as torch `F.cross_entropy(ignore_index=...)` does.
    """
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected logits [B, h, w, K] and labels [B, H, W]; got {logits.shape}, {labels.shape}"
        )
    logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
    labels = labels.astype(jnp.int32)  # the input pipeline ships uint8
    valid = labels != ignore_index
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    if avg_non_ignore:
        return total / jnp.maximum(jnp.sum(valid), 1)
    return total / labels.size
