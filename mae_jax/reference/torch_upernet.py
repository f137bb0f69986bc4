"""Plain-PyTorch copy of mmsegmentation's MAE + UPerNet heads (no mmseg / mmcv), for parity tests.

Module and parameter names follow mmseg, so `state_dict()` keys look like an mmseg checkpoint:
`neck.upsample_4x.*`, `decode_head.psp_modules.0.1.conv.weight`, `auxiliary_head.convs.0.bn.*`.
Also holds `torch_to_flax_upernet` / `load_torch_upernet`, the weight converter to
`mae_jax.models.upernet.UPerNetHeads` (tests only need it; it also reads real mmseg checkpoints,
including the older BEiT-style `backbone.fpn1` / `backbone.fpn2` neck names).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn


def resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)  # eps 1e-5, momentum 0.1
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class Feature2Pyramid(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(embed_dim),  # SyncBN in mmseg
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
        )
        self.upsample_2x = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)
        )
        self.identity = nn.Identity()
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, inputs):
        ops = [self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x]
        return [op(x) for op, x in zip(ops, inputs, strict=True)]


class PPM(nn.ModuleList):
    def __init__(self, pool_scales, in_channels, channels):
        super().__init__(
            [
                nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1))
                for s in pool_scales
            ]
        )

    def forward(self, x):
        return [resize(ppm(x), x.shape[2:]) for ppm in self]


class DecodeHead(nn.Module):
    def __init__(self, channels, num_classes, dropout):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)

    def cls_seg(self, feat):
        return self.conv_seg(self.dropout(feat))


class UPerHead(DecodeHead):
    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList(
            [ConvModule(channels, channels, 3) for _ in in_channels[:-1]]
        )
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, inputs):
        x = inputs[-1]
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)]
        outs.append(laterals[-1])
        for i in range(len(outs) - 1, 0, -1):
            outs[i] = resize(outs[i], outs[0].shape[2:])
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    def __init__(self, in_channels, channels, num_classes, dropout=0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))

    def forward(self, inputs):
        return self.cls_seg(self.convs(inputs[2]))


class UPerNetHeads(nn.Module):
    """Neck + decode head + auxiliary head; inputs NCHW, 4 maps of [B, D, h, w]."""

    def __init__(self, embed_dim, channels, aux_channels, num_classes, dropout=0.1):
        super().__init__()
        self.neck = Feature2Pyramid(embed_dim)
        self.decode_head = UPerHead([embed_dim] * 4, channels, num_classes, dropout=dropout)
        self.auxiliary_head = FCNHead(embed_dim, aux_channels, num_classes, dropout=dropout)

    def forward(self, inputs):
        pyramid = self.neck(inputs)
        return self.decode_head(pyramid), self.auxiliary_head(pyramid)


# ------------------------------------------------------------------ weight conversion
_NECK = r"(?:neck\.upsample_4x|backbone\.fpn1)"
# (torch key pattern, flax path template, kind); kinds: conv / bn / deconv.
_RULES = [
    (_NECK + r"\.0\.(\w+)$", "neck.up4_deconv1.{}", "deconv"),
    (_NECK + r"\.1\.(\w+)$", "neck.up4_norm.{}", "bn"),
    (_NECK + r"\.3\.(\w+)$", "neck.up4_deconv2.{}", "deconv"),
    (r"(?:neck\.upsample_2x|backbone\.fpn2)\.0\.(\w+)$", "neck.up2_deconv.{}", "deconv"),
    (
        r"decode_head\.psp_modules\.(\d+)\.1\.(conv|bn)\.(\w+)$",
        "decode_head.psp_modules.convs.{}.{}.{}",
        None,
    ),
    (r"decode_head\.(bottleneck|fpn_bottleneck)\.(conv|bn)\.(\w+)$", "decode_head.{}.{}.{}", None),
    (
        r"decode_head\.(lateral_convs|fpn_convs)\.(\d+)\.(conv|bn)\.(\w+)$",
        "decode_head.{}.{}.{}.{}",
        None,
    ),
    (r"(decode_head|auxiliary_head)\.conv_seg\.(\w+)$", "{}.classifier.conv_seg.{}", "conv"),
    (r"auxiliary_head\.convs\.0\.(conv|bn)\.(\w+)$", "auxiliary_head.conv.{}.{}", None),
]
_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _convert_leaf(kind: str, name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if kind == "bn":
        return _BN_NAMES[name], value
    if name == "bias":
        return "bias", value
    if kind == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
        return "kernel", value.transpose(2, 3, 1, 0)
    # ConvTranspose2d [in, out, kh, kw]: Flax's (non-transposed-kernel) ConvTranspose applies
    # the kernel spatially flipped relative to PyTorch's.
    return "kernel", value.transpose(2, 3, 0, 1)[::-1, ::-1]


def torch_to_flax_upernet(state_dict) -> dict:
    """mmseg-named state dict (neck / decode_head / auxiliary_head; other keys such as the
    backbone's are skipped) -> nested dict of numpy arrays shaped like
    `nnx.to_pure_dict(nnx.state(UPerNetHeads, nnx.Any(nnx.Param, nnx.BatchStat)))`."""
    nested: dict = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, template, kind in _RULES:
            match = re.match(pattern, key)
            if match is None:
                continue
            groups = match.groups()
            leaf_kind = kind or groups[-2]  # "conv" or "bn" from the ConvModule child name
            value = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor
            # A copy: torch updates its buffers in place and JAX may alias host numpy memory.
            name, value = _convert_leaf(leaf_kind, groups[-1], np.array(value, np.float32))
            path = template.format(*groups[:-1], name).split(".")
            node = nested
            for part in path[:-1]:
                node = node.setdefault(int(part) if part.isdigit() else part, {})
            node[path[-1]] = np.ascontiguousarray(value)
            break
    return nested


def load_torch_upernet(heads: nnx.Module, state_dict) -> None:
    """Copies an mmseg-named state dict into `UPerNetHeads` in place (params and BN stats)."""
    state = nnx.state(heads, nnx.Any(nnx.Param, nnx.BatchStat))
    expected = dict(nnx.traversals.flatten_mapping(nnx.to_pure_dict(state)))
    converted = dict(nnx.traversals.flatten_mapping(torch_to_flax_upernet(state_dict)))
    missing, unexpected = expected.keys() - converted.keys(), converted.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for path, value in converted.items():
        if value.shape != expected[path].shape:
            raise ValueError(f"{path}: shape {value.shape} != expected {expected[path].shape}")
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(converted))
    nnx.update(heads, state)
