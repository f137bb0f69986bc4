"""mmsegmentation's MAE + UPerNet checkpoints <-> `MAESegmenter` (backbone, neck, both heads and
BatchNorm running statistics).

The published `upernet_mae-base_fp16_8x2_512x512_160k_ade20k_20220426_174752-f92a2975.pth` is
`{"state_dict": ..., "meta": ...}` from mmseg's `EncoderDecoder` with (its config
`configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py` over
`configs/_base_/models/upernet_mae.py`):
  * backbone `MAE` (mmseg/models/backbones/mae.py, a `BEiT` subclass): img_size 512, patch 16,
    LN eps 1e-6, layer scale `init_values=1.0` (`gamma_1` / `gamma_2`), a relative position
    bias table per layer (zero-initialised), trainable `pos_embed`, `final_norm=False` (so no
    `backbone.ln1`), out_indices (3, 5, 7, 11). Its layers are built with `bias=True`, so the
    attention has a full `qkv.bias` like ours; BEiT's `q_bias` / `v_bias` form (no key bias) is
    read too, with a zero key bias: q . (k + b) = q . k + q . b adds the same number to every
    logit of a query row, which softmax ignores, so a zero key bias is exact;
  * neck `Feature2Pyramid` (`upsample_4x` = deconv, SyncBN, GELU, deconv; `upsample_2x` =
    deconv); decode head `UPerHead`; auxiliary head `FCNHead` (one ConvModule); every ConvModule
    is `conv.weight` (no bias) + `bn.*`.

Key names and tensor layouts (the table of every key) are `mae_jax.weights.mmseg_keys`'.

Buffers: `relative_position_index` (fixed by the grid) is checked against ours on import and
written on export; `num_batches_tracked` is dropped on import and written as 0 on export (it
only matters for BatchNorm with momentum=None, which mmseg does not use).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.models.attention import relative_position_index
from mae_jax.weights import official
from mae_jax.weights.mmseg_keys import (
    SAME,
    mmseg_key,
    rename_aliases,
    to_flax_leaves,
    to_torch,
)

# The backbone's final norm (mmseg's `backbone.ln1`), absent from final_norm=False checkpoints.
FINAL_NORM = (("backbone", "norm", "scale"), ("backbone", "norm", "bias"))


# --------------------------------------------------------------------------- reading
def read_mmseg_state_dict(path_or_state_dict) -> dict[str, np.ndarray]:
    """An mmseg checkpoint (path, `{"state_dict": ...}` or the state dict) -> {mmseg key:
    float32 numpy}, PyTorch layout. Files are read with torch.load(weights_only=True)."""
    checkpoint = path_or_state_dict
    if isinstance(checkpoint, str | os.PathLike):
        checkpoint = official.safe_torch_load(checkpoint)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Expected an mmseg state dict, got {type(checkpoint).__name__}.")
    return rename_aliases(official.read_state_dict(dict(checkpoint)))  # -> float32 numpy


def is_mmseg_checkpoint(path_or_state_dict) -> bool:
    """True for a whole mmseg segmentor checkpoint (backbone and decode-head keys), e.g. to tell
    it from an official MAE .pth. Files are memory-mapped where possible (cheap)."""
    checkpoint = path_or_state_dict
    if isinstance(checkpoint, str | os.PathLike):
        if not os.path.isfile(checkpoint):
            return False
        torch = official._import_torch()
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip-format file (no mmap), or no checkpoint at all
            try:
                checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
            except Exception:
                return False
    if not isinstance(checkpoint, Mapping):
        return False
    keys = [str(k) for k in checkpoint.get("state_dict", checkpoint)]
    return any(k.startswith("decode_head.") for k in keys) and any(
        k.startswith("backbone.") for k in keys
    )



def read_mmseg(path_or_state_dict) -> dict[tuple, np.ndarray]:
    """mmseg checkpoint -> {MAESegmenter state path: float32 numpy in Flax layout}.

    Raises for keys that have no place in an MAESegmenter (naming them).
    """
    leaves, _, unknown = to_flax_leaves(read_mmseg_state_dict(path_or_state_dict))
    if unknown:
        raise ValueError(
            f"Keys with no counterpart in MAESegmenter ({len(unknown)}): "
            f"{', '.join(sorted(unknown))}."
        )
    return leaves


# --------------------------------------------------------------------------- loading
def _weights_state(segmenter: nnx.Module) -> nnx.State:
    return nnx.state(segmenter, nnx.Any(nnx.Param, nnx.BatchStat))


def checkpoint_sizes(state_dict: Mapping[str, np.ndarray]) -> str:
    """The model sizes an mmseg MAE UPerNet state dict's shapes tell, e.g. "width 768, depth
    12, patch 16, image_size 512, num_classes 150, channels 768, aux_channels 256"."""
    sizes = {}
    if (weight := state_dict.get("backbone.patch_embed.projection.weight")) is not None:
        sizes.update(width=weight.shape[0], patch=weight.shape[-1])
        sizes["depth"] = len({key.split(".")[2] for key in state_dict
                              if key.startswith("backbone.layers.")})
        if (pos := state_dict.get("backbone.pos_embed")) is not None:
            sizes["image_size"] = round((pos.shape[1] - 1) ** 0.5) * weight.shape[-1]
    if (weight := state_dict.get("decode_head.conv_seg.weight")) is not None:
        sizes.update(num_classes=weight.shape[0], channels=weight.shape[1])
    if (weight := state_dict.get("auxiliary_head.conv_seg.weight")) is not None:
        sizes["aux_channels"] = weight.shape[1]
    return ", ".join(f"{name} {value}" for name, value in sizes.items()) or "sizes unknown"


def load_mmseg(segmenter: nnx.Module, path_or_state_dict) -> None:
    """Copies an mmseg MAE + UPerNet checkpoint into a built `MAESegmenter` in place: backbone,
    neck, heads and BatchNorm running statistics.

    Build the segmenter like the checkpoint (image_size, variant / width / depth, channels,
    num_classes, layer scale and relative position bias on): one error names every missing,
    unexpected and mis-shaped key (position and relative-position tables are not resized).
    The backbone's final norm may be absent (mmseg's final_norm=False): MAESegmenter never
    applies it, so it keeps its initial value.
    """
    raw = read_mmseg_state_dict(path_or_state_dict)
    leaves, indices, unknown = to_flax_leaves(raw)
    state = _weights_state(segmenter)
    flat = list(nnx.to_flat_state(state))
    expected = {path: variable for path, variable in flat}
    name = {path: (mmseg_key(path) or ("/".join(map(str, path)), SAME))[0] for path in expected}
    missing = sorted(name[p] for p in expected if p not in leaves and p not in FINAL_NORM)
    unexpected = sorted(unknown + [mmseg_key(p)[0] for p in leaves if p not in expected])
    # get_value(): the target may be abstract (nnx.eval_shape), holding ShapeDtypeStructs.
    misshaped = [
        f"{name[path]}: checkpoint {tuple(to_torch(mmseg_key(path)[1], leaves[path]).shape)} vs "
        f"model {tuple(to_torch(mmseg_key(path)[1], np.zeros(variable.get_value().shape)).shape)}"
        for path, variable in expected.items()
        if path in leaves and leaves[path].shape != tuple(variable.get_value().shape)
    ]
    misshaped += _check_relative_indices(segmenter, indices)
    if missing or unexpected or misshaped:
        raise official.fit_error(
            "The mmseg checkpoint does not fit the segmenter:", missing, unexpected, misshaped,
            f"Build MAESegmenter like the checkpoint's model ({checkpoint_sizes(raw)}; "
            "layer_scale_init and relative_position_bias on, as mmseg's MAE UPerNet).",
        )
    if all(p in leaves for p in FINAL_NORM):
        warnings.warn(
            "The checkpoint has a final norm (backbone.ln1, mmseg final_norm=True); it was "
            "loaded into backbone.norm, but MAESegmenter takes every feature map before any "
            "final norm, while mmseg normalises the last layer's output first: the level taken "
            "from the last block differs.",
            stacklevel=2,
        )
    for path, variable in flat:
        if path in leaves:
            variable.set_value(jnp.asarray(leaves[path], dtype=variable.get_value().dtype))
    nnx.update(segmenter, state)


def _check_relative_indices(segmenter, indices: Mapping[int, np.ndarray]) -> list[str]:
    """The checkpoint's relative_position_index buffers must be the ones of our grid."""
    problems = []
    want = relative_position_index(segmenter.backbone.grid_size)
    for layer, index in sorted(indices.items()):
        if index.shape != want.shape or not np.array_equal(index, want):
            problems.append(
                f"backbone.layers.{layer}.attn.relative_position_index: the checkpoint's "
                f"{index.shape[0] - 1}-token window is not this model's "
                f"{segmenter.backbone.grid_size} grid"
            )
    return problems


# --------------------------------------------------------------------------- export
def export_mmseg(segmenter: nnx.Module, *, final_norm: bool = False) -> dict[str, np.ndarray]:
    """The segmenter as an mmseg state dict: {key: numpy}, PyTorch layouts, float32 weights and
    running statistics, int64 `num_batches_tracked` (0) and `relative_position_index`.

    The attention keeps its full `qkv.bias` (mmseg's MAE backbone has one), so nothing is
    dropped. final_norm=False (mmseg's MAE config) leaves `backbone.norm` out: MAESegmenter
    never applies it, so the exported model computes the same function.
    """
    out = {}
    for path, variable in nnx.to_flat_state(_weights_state(segmenter)):
        if path in FINAL_NORM and not final_norm:
            continue
        found = mmseg_key(path)
        if found is None:
            raise ValueError(
                f"{'/'.join(map(str, path))} has no mmseg counterpart: only MAESegmenter "
                "(MAE backbone + Feature2Pyramid + UPerHead + FCNHead) can be exported."
            )
        key, kind = found
        out[key] = np.ascontiguousarray(to_torch(kind, np.asarray(variable[...], np.float32)))
        if key.endswith(".running_var"):  # BatchNorm's buffer, meaningless for momentum 0.1
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    backbone = segmenter.backbone
    for layer, block in enumerate(backbone.blocks):
        if block.attn.relative_position_bias_table is not None:
            index = relative_position_index(backbone.grid_size).astype(np.int64)
            out[f"backbone.layers.{layer}.attn.relative_position_index"] = index
    return out


def save_mmseg(
    segmenter: nnx.Module,
    path: str | os.PathLike,
    *,
    meta: Mapping | None = None,
    final_norm: bool = False,
) -> None:
    """Writes `{"state_dict": ..., "meta": ...}` with torch.save, as mmseg's checkpoints are
    (load it with mmseg's `load_checkpoint` or `torch.load(weights_only=True)`). meta: extra
    entries, e.g. {"CLASSES": (...), "PALETTE": [...]}; plain Python values only.

    Written to a temporary file first and renamed, so a failure never leaves half a file.
    """
    torch = official._import_torch()
    state = {
        key: torch.from_numpy(np.array(value, order="C"))
        for key, value in export_mmseg(segmenter, final_norm=final_norm).items()
    }
    info = {"exported_by": "mae_jax", "out_indices": list(segmenter.out_indices)}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"state_dict": state, "meta": info | dict(meta or {})}, tmp)
    os.replace(tmp, path)
