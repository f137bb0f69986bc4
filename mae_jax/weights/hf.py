"""Hugging Face ViTMAE checkpoints (`facebook/vit-mae-{base,large,huge}` layout) <-> official keys.

This module only renames keys and reads `config.json`; building the model, shape checks and
loading are `mae_jax.weights.official`'s (`infer_config`, `load_into`, `load_official`), so an HF
checkpoint goes through exactly the same machinery as an official `.pth` file.

Accepted inputs: a folder with `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`), or one weights file alone. Three key
layouts are read:
  * the published one (`vit.encoder.layer.{i}.attention.attention.query.weight`, ...);
  * transformers >= 5 in memory (`vit.layers.{i}.attention.q_proj.weight`, `mlp.fc1`, ...);
  * what transformers 5.x `save_pretrained` writes for the decoder
    (`decoder.decoder_encoder.layer.{i}...`, its reverse renaming applied to `decoder_layers`).
Encoder-only `ViTMAEModel` files (no `vit.` prefix, no decoder) work too. `.safetensors` files
are read with `safetensors.numpy` (no torch); `.bin` pickles with `torch.load(weights_only=True)`
through `official.read_state_dict`.

Conventions that differ from HF's `ViTMAEForPreTraining` (everything else, masking by sorting the
noise, `int(L * (1 - mask_ratio))` kept patches, the MSE over removed patches and the
norm-pix target with the unbiased variance, is the same computation):
  * HF takes `mask_ratio` from its config; here it is an argument of `MAE.forward`;
  * HF's `logits` are our `pred`; its `ids_restore` is int64, ours int32;
  * images are NCHW for HF and NHWC here;
  * HF interpolates position tables per call (`interpolate_pos_encoding`); here they are resized
    once when loading (`image_size=...`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

from mae_jax.models.mae import MAE
from mae_jax.weights import official

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, BIN_FILE)

# The official MAE is trained with LayerNorm eps 1e-6 (our models' only value). The published
# facebook/vit-mae-* configs say 1e-12, the transformers default their conversion kept: the
# weights are the official ones, so they are accepted and run with the eps they were trained with.
ACCEPTED_LAYER_NORM_EPS = (1e-6, 1e-12)

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
# What `export_hf` writes: the published spelling, which every transformers version loads.
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


def is_hf_checkpoint(path) -> bool:
    """True for an HF ViTMAE folder (`config.json` + weights), a `.safetensors` file or index,
    or a weights file next to a ViTMAE `config.json`. Official `.pth` files are not."""
    if not isinstance(path, str | os.PathLike):
        return False
    path = os.fspath(path)
    if os.path.isdir(path):  # a train.py workdir also has a config.json, but no such weights
        return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)
    if path.endswith((".safetensors", SAFETENSORS_INDEX_FILE)):
        return True
    return os.path.isfile(path) and _sibling_config(path) is not None


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


# --------------------------------------------------------------------------- config.json
def config_to_kwargs(config: Mapping, *, has_decoder: bool = True) -> dict:
    """ViTMAEConfig fields -> MAE / ViTEncoder arguments; errors for settings our models lack.

    Dropout probabilities and `initializer_range` only matter for training from scratch and are
    ignored; `mask_ratio` is an argument of `MAE.forward`, not of the model.
    """
    if config.get("model_type", "vit_mae") != "vit_mae":
        raise ValueError(
            f"config.json has model_type {config.get('model_type')!r}, not 'vit_mae': only "
            "ViTMAE checkpoints (facebook/vit-mae-*) can be read."
        )
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(
            f"hidden_act {act!r} is not supported: the MAE blocks use the exact (erf) GELU, "
            "HF's 'gelu'. A tanh-approximate checkpoint would compute a different function."
        )
    eps = float(config.get("layer_norm_eps", 1e-12))
    if not any(np.isclose(eps, allowed, rtol=1e-3, atol=0) for allowed in ACCEPTED_LAYER_NORM_EPS):
        raise ValueError(
            f"layer_norm_eps {eps:g} is not supported: the MAE models use 1e-6 (the official "
            "value; 1e-12, the value the published facebook/vit-mae-* configs carry, is "
            "accepted too since those weights were trained with 1e-6)."
        )
    kwargs = {}
    if "hidden_size" in config:
        kwargs["embed_dim"] = int(config["hidden_size"])
    if "num_hidden_layers" in config:
        kwargs["depth"] = int(config["num_hidden_layers"])
    if "num_attention_heads" in config:
        kwargs["num_heads"] = int(config["num_attention_heads"])
    if "intermediate_size" in config and "hidden_size" in config:
        kwargs["mlp_ratio"] = config["intermediate_size"] / config["hidden_size"]
    if "patch_size" in config:
        kwargs["patch_size"] = _square(config["patch_size"], "patch_size")
    if "image_size" in config:
        size = config["image_size"]
        kwargs["image_size"] = int(size) if isinstance(size, int) else tuple(int(s) for s in size)
    if "num_channels" in config:
        kwargs["in_chans"] = int(config["num_channels"])
    if not has_decoder:
        return kwargs
    if "decoder_hidden_size" in config:
        kwargs["decoder_embed_dim"] = int(config["decoder_hidden_size"])
        ratio = kwargs.get("mlp_ratio", 4.0)
        inner = config.get("decoder_intermediate_size")
        if inner is not None and inner != ratio * config["decoder_hidden_size"]:
            raise ValueError(
                f"decoder_intermediate_size {inner} is not mlp_ratio ({ratio:g}) x "
                f"decoder_hidden_size ({config['decoder_hidden_size']}): the MAE decoder shares "
                "the encoder's mlp_ratio, so this checkpoint cannot be represented."
            )
    if "decoder_num_hidden_layers" in config:
        kwargs["decoder_depth"] = int(config["decoder_num_hidden_layers"])
    if "decoder_num_attention_heads" in config:
        kwargs["decoder_num_heads"] = int(config["decoder_num_attention_heads"])
    if "norm_pix_loss" in config:
        kwargs["norm_pix_loss"] = bool(config["norm_pix_loss"])
    return kwargs


def _square(value, name: str) -> int:
    if isinstance(value, int):
        return value
    values = [int(v) for v in value]
    if len(set(values)) != 1:
        raise ValueError(f"{name} {value} is not square: the MAE models use square patches.")
    return values[0]


# --------------------------------------------------------------------------- reading files
def read_hf(path) -> tuple[dict[str, np.ndarray], dict]:
    """An HF ViTMAE folder or weights file -> (official state dict, model arguments).

    The state dict is {official key: float32 numpy, PyTorch layout}; the arguments come from
    `config.json` (the folder's, or one next to a lone weights file) and are empty without one,
    in which case `official.infer_config` derives what it can from the shapes.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Hugging Face checkpoint not found: {path}")
    weights, config_path = _locate(path)
    if weights.endswith(".safetensors"):
        state_dict = hf_to_official(_read_safetensors(weights))
    elif weights.endswith(SAFETENSORS_INDEX_FILE):
        state_dict = hf_to_official(_read_safetensors_index(weights))
    else:  # a pickle: official's torch.load(weights_only=True); it renames HF keys itself
        state_dict = hf_to_official(official.read_state_dict(weights))
    config = {}
    if config_path is not None:
        with open(config_path) as handle:
            config = json.load(handle)
    return state_dict, config_to_kwargs(config, has_decoder=official.has_decoder(state_dict))


def _locate(path: str) -> tuple[str, str | None]:
    """-> (weights file, config.json or None)."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.exists(os.path.join(path, name)):
                config = os.path.join(path, CONFIG_FILE)
                return os.path.join(path, name), config if os.path.exists(config) else None
        raise FileNotFoundError(
            f"{path} holds none of {', '.join(WEIGHT_FILES)}: not a Hugging Face checkpoint "
            "folder (download all files of e.g. facebook/vit-mae-base)."
        )
    return path, _sibling_config(path)


def _sibling_config(path: str) -> str | None:
    """The ViTMAE config.json next to a weights file, if there is one."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    if not os.path.exists(config):
        return None
    try:
        with open(config) as handle:
            model_type = json.load(handle).get("model_type")
    except (OSError, ValueError):
        return None
    return config if model_type == "vit_mae" else None


def _import_safetensors():
    try:
        from safetensors import numpy as safetensors_numpy
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading or writing .safetensors files needs the safetensors package: "
            "pip install safetensors (torch is not needed)."
        ) from error
    return safetensors_numpy


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return dict(_import_safetensors().load_file(path))
    except ImportError:
        raise
    except Exception as error:
        raise ValueError(f"Cannot read {path} as a safetensors file: {error}") from error


def _read_safetensors_index(path: str) -> dict[str, np.ndarray]:
    """A sharded checkpoint: the index's weight_map names the shard of every tensor."""
    with open(path) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    out = {}
    for shard in shards:
        out.update(_read_safetensors(os.path.join(os.path.dirname(path), shard)))
    return out


# --------------------------------------------------------------------------- writing
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


def export_hf(model) -> tuple[dict[str, np.ndarray], dict]:
    """An MAE (-> ViTMAEForPreTraining) or ViTEncoder (-> ViTMAEModel) -> (HF state dict of
    float32 numpy in PyTorch layout, config.json as a dict)."""

    is_mae = isinstance(model, MAE)
    encoder = model.encoder if is_mae else model
    state = official.export_official(model)
    height, width = encoder.image_size
    config = {
        "architectures": ["ViTMAEForPreTraining" if is_mae else "ViTMAEModel"],
        "model_type": "vit_mae",
        "hidden_size": encoder.embed_dim,
        "num_hidden_layers": encoder.depth,
        "num_attention_heads": _heads(encoder.blocks, default=12),
        "intermediate_size": int(state["blocks.0.mlp.fc1.weight"].shape[0])
        if encoder.depth else 4 * encoder.embed_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": height if height == width else [height, width],
        "patch_size": encoder.patch_size,
        "num_channels": encoder.in_chans,
        "qkv_bias": True,
        "mask_ratio": 0.75,
    }
    if is_mae:
        decoder_dim = int(state["decoder_embed.weight"].shape[0])
        config |= {
            "decoder_hidden_size": decoder_dim,
            "decoder_num_hidden_layers": len(model.decoder.blocks),
            "decoder_num_attention_heads": _heads(model.decoder.blocks, default=16),
            "decoder_intermediate_size": int(state["decoder_blocks.0.mlp.fc1.weight"].shape[0])
            if len(model.decoder.blocks) else 4 * decoder_dim,
            "norm_pix_loss": bool(model.norm_pix_loss),
        }
    return official_to_hf(state, prefix="vit." if is_mae else ""), config


def _heads(blocks, *, default: int) -> int:
    return blocks[0].attn.num_heads if len(blocks) else default


def save_hf(model, folder: str | os.PathLike) -> None:
    """Writes `config.json` and `model.safetensors` (numpy; torch not needed) into `folder`,
    loadable by `transformers.ViTMAEForPreTraining.from_pretrained(folder)` (or `ViTMAEModel`
    for an encoder). Files are written under temporary names and renamed, so a failure never
    leaves half a checkpoint."""
    state, config = export_hf(model)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, SAFETENSORS_FILE)
    # transformers refuses safetensors files without the "format" metadata of its own writers.
    _import_safetensors().save_file(state, f"{weights}.tmp", metadata={"format": "pt"})
    os.replace(f"{weights}.tmp", weights)
    config_path = os.path.join(folder, CONFIG_FILE)
    with open(f"{config_path}.tmp", "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    os.replace(f"{config_path}.tmp", config_path)
