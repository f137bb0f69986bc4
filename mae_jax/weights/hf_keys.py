"""Hugging Face ViTMAE state-dict keys <-> the official MAE keys (renaming and q / k / v fusing).

Three HF key layouts are read:
  * the published one (`vit.encoder.layer.{i}.attention.attention.query.weight`, ...);
  * transformers >= 5 in memory (`vit.layers.{i}.attention.q_proj.weight`, `mlp.fc1`, ...);
  * what transformers 5.x `save_pretrained` writes for the decoder
    (`decoder.decoder_encoder.layer.{i}...`, its reverse renaming applied to `decoder_layers`).
Encoder-only `ViTMAEModel` dicts (no `vit.` prefix, no decoder) work too. Writing uses the
published spelling, which every transformers version loads. Files and `config.json` are
`mae_jax.weights.hf`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

# Inside one transformer layer: HF sub-key (any of its spellings) -> official sub-key.
_LAYER_KEYS = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
# What `official_to_hf` writes: the published spelling, which every transformers version loads.
_LAYER_KEYS_OUT = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV_PARTS = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}
_QKV_OUT = ("query", "key", "value")

# Outside the layers: HF key (after dropping a leading "vit.") -> official key.
_TOP_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
_ENCODER_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$")
_QKV = re.compile(r"^attention\.(?:attention\.(query|key|value)|(q_proj|k_proj|v_proj))\.(\w+)$")
_HF_MARKER = re.compile(r"(?:^|\.)embeddings\.patch_embeddings\.projection\.weight$")


# --------------------------------------------------------------------------- detection
def is_hf_state_dict(state_dict: Mapping) -> bool:
    """True when the keys are a ViTMAE state dict (with or without the `vit.` prefix)."""
    return any(_HF_MARKER.search(str(key)) for key in state_dict)


# --------------------------------------------------------------------------- keys: HF -> official
def hf_to_official(state_dict: Mapping) -> dict[str, np.ndarray]:
    """HF ViTMAE state dict -> {official key: float32 numpy}, PyTorch layout.

    q / k / v Linears [D, D] are stacked into the official fused `attn.qkv` [3D, D] (q, k, v
    order, as timm's reshape(..., 3, heads, head_dim) reads it). Files saved with
    `qkv_bias=False` get zero q/k/v biases: the same function. Already-official dicts pass
    through unchanged.
    """
    if not is_hf_state_dict(state_dict):
        return {key: _float32(key, value) for key, value in state_dict.items()}
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    unknown = []
    for raw_key, value in state_dict.items():
        key = raw_key[len("vit."):] if raw_key.startswith("vit.") else raw_key
        value = _float32(raw_key, value)
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
            continue
        match = _ENCODER_LAYER.match(key) or _DECODER_LAYER.match(key)
        if match is None:
            unknown.append(raw_key)
            continue
        prefix = "blocks" if match.re is _ENCODER_LAYER else "decoder_blocks"
        block, rest = f"{prefix}.{match.group(1)}", match.group(2)
        if part := _QKV.match(rest):
            name = part.group(1) or part.group(2)
            qkv.setdefault((block, part.group(3)), {})[_QKV_PARTS[name]] = value
            continue
        sub, _, leaf = rest.rpartition(".")
        if sub not in _LAYER_KEYS:
            unknown.append(raw_key)
            continue
        out[f"{block}.{_LAYER_KEYS[sub]}.{leaf}"] = value
    if unknown:
        raise ValueError(
            f"Keys of this ViTMAE checkpoint have no MAE counterpart ({len(unknown)}): "
            f"{', '.join(sorted(unknown))}. Only ViTMAEForPreTraining / ViTMAEModel checkpoints "
            "are supported."
        )
    out.update(_fuse_qkv(qkv))
    return out


def _fuse_qkv(parts: dict[tuple[str, str], dict[int, np.ndarray]]) -> dict[str, np.ndarray]:
    """{(block, "weight"|"bias"): {0: q, 1: k, 2: v}} -> {block.attn.qkv.*: [3D, ...]}."""
    out = {}
    for (block, leaf), pieces in sorted(parts.items()):
        if sorted(pieces) != [0, 1, 2]:
            absent = [_QKV_OUT[i] for i in range(3) if i not in pieces]
            raise ValueError(f"{block}: the checkpoint lacks the attention {leaf} of {absent}.")
        out[f"{block}.attn.qkv.{leaf}"] = np.concatenate([pieces[i] for i in range(3)], axis=0)
    for block, leaf in parts:
        bias_key = f"{block}.attn.qkv.bias"
        if leaf == "weight" and bias_key not in out:  # saved with qkv_bias=False
            out[bias_key] = np.zeros(out[f"{block}.attn.qkv.weight"].shape[0], np.float32)
    return out


def _float32(key: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: cannot convert a {getattr(value, 'dtype', type(value))} "
                         f"array to float32 ({error}).") from error


# --------------------------------------------------------------------------- keys: official -> HF
def official_to_hf(state_dict: Mapping[str, np.ndarray], *, prefix: str = "vit.") -> dict:
    """Official state dict -> HF keys in the published spelling (loads in every transformers).

    prefix: "vit." for ViTMAEForPreTraining, "" for an encoder-only ViTMAEModel.
    """
    out, unknown = {}, []
    top = {official_key: hf_key for hf_key, official_key in _TOP_KEYS.items()}
    block = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(\w+)$")
    for key, value in state_dict.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if key in top:
            hf_key = top[key]
            out[hf_key if hf_key.startswith("decoder.") else prefix + hf_key] = value
            continue
        match = block.match(key)
        if match is None:
            unknown.append(key)
            continue
        kind, index, sub, leaf = match.groups()
        layer = f"{prefix}encoder.layer.{index}" if kind == "blocks" else (
            f"decoder.decoder_layers.{index}")
        if sub == "attn.qkv":
            for name, piece in zip(_QKV_OUT, np.split(value, 3, axis=0), strict=True):
                out[f"{layer}.attention.attention.{name}.{leaf}"] = np.ascontiguousarray(piece)
        elif sub in _LAYER_KEYS_OUT:
            out[f"{layer}.{_LAYER_KEYS_OUT[sub]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"These weights have no place in a ViTMAE checkpoint: {', '.join(sorted(unknown))} "
            "(layer scale and relative position bias exist only in segmentation backbones)."
        )
    return out
