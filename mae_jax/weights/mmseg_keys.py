"""mmsegmentation MAE + UPerNet state-dict keys and tensor layouts <-> `MAESegmenter` state paths.

One table (`_table`) pairs every mmseg key with its Flax state path and layout; `{i}` stands for
a layer / module index. Reading also accepts BEiT's `q_bias` / `v_bias` form of the attention
bias (no key bias; a zero key bias is exact, see `mae_jax.weights.mmseg`) and the older BEiT-era
names of the neck (`backbone.fpn1` / `backbone.fpn2`).

Layouts: PyTorch convs are OIHW, Flax HWIO; PyTorch ConvTranspose2d is [in, out, kh, kw] and
applies its kernel spatially flipped relative to Flax's (non-transposed-kernel) ConvTranspose,
so the kernel is also flipped in both directions. Linears are [out, in] vs [in, out].

Reading and writing files, loading into a segmenter and exporting are `mae_jax.weights.mmseg`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

SAME, LINEAR, CONV, DECONV = "same", "linear", "conv", "deconv"
_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


# --------------------------------------------------------------------------- the key table
def _bn(torch_prefix: str, flax_prefix: str) -> list[tuple[str, str, str]]:
    return [(f"{torch_prefix}.{t}", f"{flax_prefix}/{f}", SAME) for t, f in _BN]


def _conv_module(torch_prefix: str, flax_prefix: str) -> list[tuple[str, str, str]]:
    """mmcv ConvModule: conv (bias=False next to a norm) + bn."""
    return [(f"{torch_prefix}.conv.weight", f"{flax_prefix}/conv/kernel", CONV)] + _bn(
        f"{torch_prefix}.bn", f"{flax_prefix}/bn"
    )


def _dense(torch_prefix: str, flax_prefix: str, kind: str) -> list[tuple[str, str, str]]:
    """A Linear / conv / deconv with bias."""
    return [
        (f"{torch_prefix}.weight", f"{flax_prefix}/kernel", kind),
        (f"{torch_prefix}.bias", f"{flax_prefix}/bias", SAME),
    ]


def _norm(torch_prefix: str, flax_prefix: str) -> list[tuple[str, str, str]]:
    return [
        (f"{torch_prefix}.weight", f"{flax_prefix}/scale", SAME),
        (f"{torch_prefix}.bias", f"{flax_prefix}/bias", SAME),
    ]


def _table() -> list[tuple[str, str, str]]:
    """(mmseg key, Flax path joined by "/", layout); `{i}` stands for a layer / module index."""
    layer, block = "backbone.layers.{i}", "backbone/blocks/{i}"
    decode, ours = "decode_head", "heads/decode_head"
    return [
        ("backbone.cls_token", "backbone/cls_token", SAME),
        ("backbone.pos_embed", "backbone/pos_embed", SAME),
        *_dense("backbone.patch_embed.projection", "backbone/patch_embed/proj", CONV),
        *_norm(f"{layer}.ln1", f"{block}/norm1"),
        *_dense(f"{layer}.attn.qkv", f"{block}/attn/qkv", LINEAR),
        *_dense(f"{layer}.attn.proj", f"{block}/attn/proj", LINEAR),
        (f"{layer}.attn.relative_position_bias_table",
         f"{block}/attn/relative_position_bias_table", SAME),
        *_norm(f"{layer}.ln2", f"{block}/norm2"),
        *_dense(f"{layer}.ffn.layers.0.0", f"{block}/mlp/fc1", LINEAR),  # mmcv FFN
        *_dense(f"{layer}.ffn.layers.1", f"{block}/mlp/fc2", LINEAR),
        (f"{layer}.gamma_1", f"{block}/gamma_1", SAME),
        (f"{layer}.gamma_2", f"{block}/gamma_2", SAME),
        *_norm("backbone.ln1", "backbone/norm"),  # final norm, only when final_norm=True
        *_dense("neck.upsample_4x.0", "heads/neck/up4_deconv1", DECONV),
        *_bn("neck.upsample_4x.1", "heads/neck/up4_norm"),
        *_dense("neck.upsample_4x.3", "heads/neck/up4_deconv2", DECONV),
        *_dense("neck.upsample_2x.0", "heads/neck/up2_deconv", DECONV),
        *_conv_module(f"{decode}.psp_modules.{{i}}.1", f"{ours}/psp_modules/convs/{{i}}"),
        *_conv_module(f"{decode}.bottleneck", f"{ours}/bottleneck"),
        *_conv_module(f"{decode}.lateral_convs.{{i}}", f"{ours}/lateral_convs/{{i}}"),
        *_conv_module(f"{decode}.fpn_convs.{{i}}", f"{ours}/fpn_convs/{{i}}"),
        *_conv_module(f"{decode}.fpn_bottleneck", f"{ours}/fpn_bottleneck"),
        *_dense(f"{decode}.conv_seg", f"{ours}/classifier/conv_seg", CONV),
        *_conv_module("auxiliary_head.convs.0", "heads/auxiliary_head/conv"),
        *_dense("auxiliary_head.conv_seg", "heads/auxiliary_head/classifier/conv_seg", CONV),
    ]


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_RULES = [(_compile(t), t, _compile(f), f, kind) for t, f, kind in _table()]
_Q_OR_V_BIAS = re.compile(r"^backbone\.layers\.(\d+)\.attn\.(q_bias|v_bias)$")
_REL_INDEX = re.compile(r"^backbone\.layers\.(\d+)\.attn\.relative_position_index$")
_ALIASES = (("backbone.fpn1.", "neck.upsample_4x."), ("backbone.fpn2.", "neck.upsample_2x."))


def flax_path(key: str) -> tuple[tuple, str] | None:
    """mmseg key -> (Flax state path, layout), or None for keys outside the table."""
    for torch_re, _, _, flax_template, kind in _RULES:
        if match := torch_re.match(key):
            path = flax_template.format(**match.groupdict()).split("/")
            return tuple(int(p) if p.isdigit() else p for p in path), kind
    return None


def mmseg_key(path: tuple) -> tuple[str, str] | None:
    """Flax state path -> (mmseg key, layout), or None."""
    joined = "/".join(str(p) for p in path)
    for _, torch_template, flax_re, _, kind in _RULES:
        if match := flax_re.match(joined):
            return torch_template.format(**match.groupdict()), kind
    return None


def rename_aliases(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Older BEiT-era configs put the neck into the backbone (`backbone.fpn1` / `fpn2`): renamed
    to mmseg's current `neck.upsample_4x` / `neck.upsample_2x` (reading only)."""
    for old, new in _ALIASES:
        state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------- layouts
def to_flax(kind: str, value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout for one tensor."""
    if kind == LINEAR:  # [out, in] -> [in, out]
        return value.T
    if kind == CONV:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if kind == DECONV:  # [in, out, kh, kw] -> [kh, kw, in, out], spatially flipped
        return value.transpose(2, 3, 0, 1)[::-1, ::-1]
    return value


def to_torch(kind: str, value: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout (inverse of `to_flax`)."""
    if kind == LINEAR:
        return value.T
    if kind == CONV:  # HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if kind == DECONV:
        return value[::-1, ::-1].transpose(2, 3, 0, 1)
    return value


# --------------------------------------------------------------------------- a whole state dict
def to_flax_leaves(state: Mapping[str, np.ndarray]):
    """{mmseg key: array} -> ({Flax path: array in Flax layout}, {layer: relative index},
    [unknown keys])."""
    leaves, indices, unknown, qv = {}, {}, [], {}
    for key, value in state.items():
        if key.endswith(".num_batches_tracked"):
            continue
        if match := _REL_INDEX.match(key):
            indices[int(match.group(1))] = value
            continue
        if match := _Q_OR_V_BIAS.match(key):
            qv.setdefault(int(match.group(1)), {})[match.group(2)] = value
            continue
        found = flax_path(key)
        if found is None:
            unknown.append(key)
            continue
        path, kind = found
        leaves[path] = np.ascontiguousarray(to_flax(kind, value))
    for layer, biases in sorted(qv.items()):
        path = ("backbone", "blocks", layer, "attn", "qkv", "bias")
        if path in leaves or sorted(biases) != ["q_bias", "v_bias"]:
            raise ValueError(
                f"backbone.layers.{layer}.attn: expected either qkv.bias or both q_bias and "
                f"v_bias, got {sorted(biases) + (['qkv.bias'] if path in leaves else [])}."
            )
        q, v = biases["q_bias"], biases["v_bias"]
        # BEiT's qv_bias: no key bias. Zero is exact (softmax ignores a per-row constant).
        leaves[path] = np.concatenate([q, np.zeros_like(q), v])
    return leaves, indices, unknown
