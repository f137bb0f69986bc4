"""Hugging Face ViTMAE checkpoints (`facebook/vit-mae-{base,large,huge}` layout): files and
`config.json`, read into and written from the official layout.

This module only handles files and `config.json`; the key renaming is
`mae_jax.weights.hf_keys`'s, and building the model, shape checks and loading are
`mae_jax.weights.official`'s (`infer_config`, `load_into`, `load_official`), so an HF checkpoint
goes through exactly the same machinery as an official `.pth` file.

Accepted inputs: a folder with `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`), or one weights file alone, in any of the
key layouts `hf_keys` reads. `.safetensors` files are read with `safetensors.numpy` (no torch);
`.bin` pickles with `torch.load(weights_only=True)` through `official.read_state_dict`.

Conventions that differ from HF's `ViTMAEForPreTraining` (everything else, masking by sorting the
noise, `int(L * (1 - mask_ratio))` kept patches, the MSE over removed patches and the
norm-pix target with the unbiased variance, is the same computation):
  * HF takes `mask_ratio` from its config; here it is an argument of `MAE.forward`;
  * HF's `logits` are our `pred`; its `ids_restore` is int64, ours int32;
  * images are NCHW for HF and NHWC here;
  * HF interpolates position tables per call (`interpolate_pos_encoding`); here they are resized
    once when loading (`image_size=...`). The encoder's table is resized as HF does it (the same
    values to float32 rounding); the decoder's is resized over the 2-D grid, as the official
    code does, where HF resizes it as a 1-D sequence: at another image size the predictions
    differ from HF's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from mae_jax.core.errors import DataNotFoundError, WeightsError
from mae_jax.models.mae import MAE
from mae_jax.models.vit import ViTEncoder
from mae_jax.weights import official
from mae_jax.weights.hf_keys import hf_to_official, official_to_hf

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, BIN_FILE)

# The official MAE is trained with LayerNorm eps 1e-6 (our models' only value). The published
# facebook/vit-mae-* configs say 1e-12, the transformers default their conversion kept: the
# weights are the official ones, so they are accepted and run with the eps they were trained with.
ACCEPTED_LAYER_NORM_EPS = (1e-6, 1e-12)


# --------------------------------------------------------------------------- detection
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


# --------------------------------------------------------------------------- config.json
def config_to_kwargs(config: Mapping, *, has_decoder: bool = True) -> dict:
    """ViTMAEConfig fields -> MAE / ViTEncoder arguments; errors for settings our models lack.

    Dropout probabilities and `initializer_range` only matter for training from scratch and are
    ignored; `mask_ratio` is an argument of `MAE.forward`, not of the model.
    """
    if config.get("model_type", "vit_mae") != "vit_mae":
        raise WeightsError(
            f"config.json has model_type {config.get('model_type')!r}, not 'vit_mae': only "
            "ViTMAE checkpoints (facebook/vit-mae-*) can be read."
        )
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise WeightsError(
            f"hidden_act {act!r} is not supported: the MAE blocks use the exact (erf) GELU, "
            "HF's 'gelu'. A tanh-approximate checkpoint would compute a different function."
        )
    eps = float(config.get("layer_norm_eps", 1e-12))
    if not any(np.isclose(eps, allowed, rtol=1e-3, atol=0) for allowed in ACCEPTED_LAYER_NORM_EPS):
        raise WeightsError(
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
            raise WeightsError(
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
        raise WeightsError(f"{name} {value} is not square: the MAE models use square patches.")
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
        raise DataNotFoundError(f"Hugging Face checkpoint not found: {path}")
    weights, config_path = _locate(path)
    if weights.endswith(".safetensors"):
        state_dict = hf_to_official(_read_safetensors(weights))
    elif weights.endswith(SAFETENSORS_INDEX_FILE):
        state_dict = hf_to_official(_read_safetensors_index(weights))
    else:  # a pickle: official's torch.load(weights_only=True); it renames HF keys itself
        state_dict = hf_to_official(official.read_state_dict(weights))
    config = _read_json(config_path) if config_path is not None else {}
    check_config_fits(config, state_dict, config_path)
    return state_dict, config_to_kwargs(config, has_decoder=official.has_decoder(state_dict))


def check_config_fits(config: Mapping, state_dict: Mapping[str, np.ndarray], where) -> None:
    """WeightsError naming each size `config.json` states that the weights' shapes contradict
    (transformers refuses such a folder too; QA: another image_size was taken silently, and
    another hidden_size was blamed on decoder_intermediate_size)."""
    def rows(key):
        return state_dict[key].shape[0] if key in state_dict else None

    shapes = {
        "hidden_size": state_dict["cls_token"].shape[-1] if "cls_token" in state_dict else None,
        "num_hidden_layers": official.count_blocks(state_dict, "blocks") or None,
        "intermediate_size": rows("blocks.0.mlp.fc1.weight"),
        "num_channels": (state_dict["patch_embed.proj.weight"].shape[1]
                         if "patch_embed.proj.weight" in state_dict else None),
        "decoder_hidden_size": rows("decoder_embed.weight"),
        "decoder_num_hidden_layers": official.count_blocks(state_dict, "decoder_blocks") or None,
        "decoder_intermediate_size": rows("decoder_blocks.0.mlp.fc1.weight"),
    }
    wrong = [f"{name} {config[name]} (the weights: {have})" for name, have in shapes.items()
             if have is not None and name in config and config[name] != have]
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is not None and "patch_size" in config:
        patch = config["patch_size"]
        patches = [patch] * 2 if isinstance(patch, int) else list(patch)
        if list(patches) != list(weight.shape[-2:]):
            wrong.append(f"patch_size {patch} (the weights: {weight.shape[-1]})")
        elif "image_size" in config and "pos_embed" in state_dict:
            size = config["image_size"]
            height, width = (size, size) if isinstance(size, int) else size
            positions = (height // patches[0]) * (width // patches[1])
            if positions != state_dict["pos_embed"].shape[1] - 1:
                wrong.append(f"image_size {size} ({positions} patches; the position table: "
                             f"{state_dict['pos_embed'].shape[1] - 1})")
    if wrong:
        raise WeightsError(
            f"{where} does not describe the weights beside it: {'; '.join(wrong)}. The files "
            "come from different checkpoints: download the folder again."
            + (" (Another image size is an argument when loading: image_size=...)"
               if wrong[-1].startswith("image_size") else ""))


def _locate(path: str) -> tuple[str, str | None]:
    """-> (weights file, config.json or None)."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.exists(os.path.join(path, name)):
                config = os.path.join(path, CONFIG_FILE)
                return os.path.join(path, name), config if os.path.exists(config) else None
        raise DataNotFoundError(
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


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            content = json.load(handle)
    except ValueError as error:
        raise WeightsError(f"{path} is not valid JSON ({error}): download it again.") from None
    if not isinstance(content, Mapping):
        raise WeightsError(f"{path} holds a JSON {type(content).__name__}, not an object.")
    return content


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
        raise WeightsError(f"Cannot read {path} as a safetensors file: {error}") from error


def _read_safetensors_index(path: str) -> dict[str, np.ndarray]:
    """A sharded checkpoint: the index's weight_map names the shard of every tensor."""
    index = _read_json(path)
    if not isinstance(index.get("weight_map"), Mapping):
        raise WeightsError(f"{path} has no weight_map: not a safetensors index (download it "
                           "again).")
    shards = sorted(set(index["weight_map"].values()))
    out = {}
    for shard in shards:
        out.update(_read_safetensors(os.path.join(os.path.dirname(path), shard)))
    return out



def export_hf(model) -> tuple[dict[str, np.ndarray], dict]:
    """An MAE (-> ViTMAEForPreTraining) or ViTEncoder (-> ViTMAEModel) -> (HF state dict of
    float32 numpy in PyTorch layout, config.json as a dict)."""

    is_mae = isinstance(model, MAE)
    if not isinstance(model, MAE | ViTEncoder):
        raise TypeError(f"save_hf writes an MAE or a ViT encoder, not a {type(model).__name__} "
                        "(a classifier: mae_jax.classification.transfer"
                        ".save_official_classifier).")
    encoder = model.encoder if is_mae else model
    if encoder.norm is None:
        raise WeightsError(
            "This encoder has no final norm (a fine-tuned classifier's, whose global pooling "
            "deletes it), and transformers' ViTMAEModel applies one: the folder would compute "
            "another function. Export the pretrained encoder, or this one with save_official "
            "(the whole classifier: mae_jax.classification.transfer.save_official_classifier).")
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
