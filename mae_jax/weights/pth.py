"""Official `.pth` files: read safely (`torch.load(weights_only=True)`), as float32 arrays,
and the architecture record `save_official` writes beside the weights (what no weight's shape
tells). torch is imported lazily, only here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import numpy as np

from mae_jax.core.errors import DataNotFoundError, WeightsError
from mae_jax.models.mae import MAE
from mae_jax.models.vit import ViTEncoder

ARCHITECTURE_KEY = "mae_jax_architecture"  # beside "model" in the files save_official writes


def _import_torch():
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading or writing official .pth checkpoints needs PyTorch: "
            "pip install torch (the CPU build is enough)."
        ) from error
    return torch


def safe_torch_load(path: str | os.PathLike):
    """torch.load(weights_only=True): a pickle that would run code is refused, by name. The
    official training code's checkpoints (`checkpoint-N.pth`) also hold its `args`, an
    argparse.Namespace (plain attributes, no code): that one class is allowed."""
    torch = _import_torch()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataNotFoundError(f"Checkpoint file not found: {path}")
    with open(path, "rb") as handle:  # torch.save's zip archive, or a legacy pickle
        if not (head := handle.read(4)).startswith(b"\x80") and head != b"PK\x03\x04":
            raise WeightsError(f"{path} is not a PyTorch checkpoint (empty, or another kind of "
                               "file?): give an official .pth, a run directory, its export/ "
                               "folder or a Hugging Face folder.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"Refusing to load {path}: it is not a plain tensor checkpoint that "
            "torch.load(weights_only=True) accepts (it may contain code that would run when "
            f"unpickled, or be corrupt). Details: {str(error) or type(error).__name__}"
        ) from error


def read_state_dict(path_or_state_dict) -> dict[str, np.ndarray]:
    """An official checkpoint (path or dict) -> {official key: float32 numpy array}.

    Accepts the raw state dict or the official `{"model": state_dict, ...}` wrapper.
    """
    if isinstance(path_or_state_dict, str | os.PathLike):
        checkpoint = safe_torch_load(path_or_state_dict)
    else:
        checkpoint = path_or_state_dict
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"Expected a state dict (a mapping), got {type(checkpoint).__name__}.")
    for wrapper in ("model", "state_dict"):  # the official and the Lightning / mmseg wrappers
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    out = {}
    for key, value in checkpoint.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().float().numpy()
        try:
            out[key] = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise WeightsError(
                f"{key!r} in the checkpoint is a {type(value).__name__}, not an array: this is "
                "not an encoder's state dict (a segmenter? load it with load_model or "
                "mae_jax.weights.mmseg)."
            ) from None
    return out


def recorded_architecture(model: MAE | ViTEncoder) -> dict:
    """What no weight's shape tells (head counts, the loss's pixel normalisation, a grid that is
    not square, layer scale and relative position bias), saved beside the weights so that the
    file reloads as the model it came from."""
    encoder = model.encoder if isinstance(model, MAE) else model
    out = {"image_size": [int(size) for size in encoder.image_size]}
    if encoder.norm is None:  # a fine-tuned encoder (QA: it did not reload: "missing norm")
        out["final_norm"] = False
    if len(encoder.blocks):
        block = encoder.blocks[0]
        out["num_heads"] = int(block.attn.num_heads)
        if block.gamma_1 is not None:  # the value only initialises: the weights replace it
            out["layer_scale_init"] = 1.0
        if getattr(block.attn, "relative_grid", None) is not None:
            out["relative_position_bias"] = True
    if isinstance(model, MAE):
        out["norm_pix_loss"] = bool(model.norm_pix_loss)
        if len(model.decoder.blocks):
            out["decoder_num_heads"] = int(model.decoder.blocks[0].attn.num_heads)
    return out


def recorded(checkpoint) -> dict:
    """The architecture a checkpoint records: ours (`save_official`), or the official
    training code's `args.norm_pix_loss`."""
    if not isinstance(checkpoint, Mapping):
        return {}
    record = checkpoint.get(ARCHITECTURE_KEY)
    if isinstance(record, Mapping):
        record = dict(record)
        if isinstance(record.get("image_size"), list | tuple):
            record["image_size"] = tuple(int(size) for size in record["image_size"])
        return record
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace) and hasattr(args, "norm_pix_loss"):
        return {"norm_pix_loss": bool(args.norm_pix_loss)}
    return {}
