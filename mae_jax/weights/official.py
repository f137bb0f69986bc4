"""Import and export of the official PyTorch MAE checkpoints (`facebookresearch/mae` key layout).

Official files are pickles: they are read with `torch.load(..., weights_only=True)`, so a file
that would run code when unpickled is refused. torch is needed only here, and imported lazily.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.core.errors import DataNotFoundError, WeightsError
from mae_jax.models.layers import FixedEmbedding, make_rngs
from mae_jax.models.mae import MAE
from mae_jax.models.pos_embed import resize_pos_embed
from mae_jax.models.registry import DEFAULT_DECODER, VARIANTS, find_variant
from mae_jax.models.vit import ViTEncoder

POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")
_DECODER_NAMES = {"embed": "decoder_embed", "norm": "decoder_norm", "pred": "decoder_pred",
                  "blocks": "decoder_blocks", "pos_embed": "decoder_pos_embed"}
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


def official_key(path: tuple) -> str:
    """Flax state path -> official key, e.g. ('encoder','blocks',0,'attn','qkv','kernel')
    -> 'blocks.0.attn.qkv.weight'."""
    parts = [str(part) for part in path]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    if parts[0] == "encoder":
        parts = parts[1:]
    elif parts[0] == "decoder":
        parts = [_DECODER_NAMES.get(parts[1], parts[1])] + parts[2:]
    return ".".join(parts)


def to_official_array(key: str, value: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout for one tensor."""
    value = np.asarray(value, dtype=np.float32)
    if key.endswith(".weight") and value.ndim == 2:
        return value.T
    if key.endswith(".weight") and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return value


def from_official_array(key: str, value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout for one tensor."""
    if key.endswith(".weight") and value.ndim == 2:
        return value.T
    if key.endswith(".weight") and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return value


def _loadable_state(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.Any(nnx.Param, FixedEmbedding))


def export_official(model: MAE | ViTEncoder) -> dict[str, np.ndarray]:
    """The model's weights in the official key layout: {key: float32 numpy (PyTorch layout)}."""
    out = {}
    for path, variable in nnx.to_flat_state(_loadable_state(model)):
        key = official_key(path)
        out[key] = to_official_array(key, np.asarray(variable[...]))
    return out


def save_official(model: MAE | ViTEncoder, path: str | os.PathLike) -> None:
    """Writes `{"model": state_dict}` with torch.save, readable by the official code.

    Written to a temporary file first and renamed, so a failure never leaves half a file.
    """
    torch = _import_torch()
    state = {key: torch.from_numpy(np.array(v, copy=True)) for key, v in
             export_official(model).items()}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"model": state, ARCHITECTURE_KEY: recorded_architecture(model)}, tmp)
    os.replace(tmp, path)


def recorded_architecture(model: MAE | ViTEncoder) -> dict:
    """What no weight's shape tells (head counts, the loss's pixel normalisation), saved
    beside the weights so that the file reloads as the model it came from."""
    encoder = model.encoder if isinstance(model, MAE) else model
    out = {"num_heads": int(encoder.blocks[0].attn.num_heads)} if len(encoder.blocks) else {}
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
        return dict(record)
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace) and hasattr(args, "norm_pix_loss"):
        return {"norm_pix_loss": bool(args.norm_pix_loss)}
    return {}


def _count_blocks(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(ids) + 1 if ids else 0


def infer_config(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Model arguments implied by an official state dict's shapes (heads from the registry)."""
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        segmenter = any(key.startswith(("backbone.", "decode_head.")) for key in state_dict)
        raise WeightsError(
            f"Not an official MAE/ViT checkpoint: missing {missing}. Found keys such as "
            f"{sorted(state_dict)[:5]}."
            + (" It is a segmenter (mmseg's layout): segment.py reads it (init_from), as "
               "does mae_jax.weights.mmseg.load_mmseg." if segmenter else "")
        )
    embed_dim = state_dict["cls_token"].shape[-1]
    weight = state_dict["patch_embed.proj.weight"]
    patch_size, in_chans = weight.shape[-1], weight.shape[1]
    depth = _count_blocks(state_dict, "blocks")
    grid = int(round((state_dict["pos_embed"].shape[1] - 1) ** 0.5))
    config = {
        "embed_dim": embed_dim,
        "depth": depth,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "image_size": grid * patch_size,
    }
    if "blocks.0.mlp.fc1.weight" in state_dict:
        config["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    name = find_variant(embed_dim=embed_dim, depth=depth, patch_size=patch_size)
    if name is not None:
        config["num_heads"] = VARIANTS[name].num_heads
    if "decoder_embed.weight" in state_dict:
        config["decoder_embed_dim"] = state_dict["decoder_embed.weight"].shape[0]
        config["decoder_depth"] = _count_blocks(state_dict, "decoder_blocks")
    return config


def is_finetuned_classifier(state_dict: Mapping[str, np.ndarray]) -> bool:
    """An official `models_vit` fine-tuned classifier: `fc_norm` after the pool, no final norm."""
    return "fc_norm.weight" in state_dict and "norm.weight" not in state_dict


def has_decoder(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(key.startswith("decoder_") or key == "mask_token" for key in state_dict)


def load_into(
    model: MAE | ViTEncoder,
    state_dict,
    *,
    strict: bool = True,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Copies official weights into `model` in place.

    Position embeddings of another grid are resized bicubically (official
    `interpolate_pos_embed`). Raises one error naming every missing, unexpected and mis-shaped
    key. With strict=False, keys the model does not have (e.g. a decoder when loading an
    encoder) are ignored, but missing and mis-shaped ones still fail. `allow_missing`: regexes
    of model keys that may stay as initialised (e.g. layer-scale gammas the official MAE lacks).
    """
    state_dict = read_state_dict(state_dict)
    target = _loadable_state(model)
    flat = list(nnx.to_flat_state(target))
    expected = {official_key(path): (path, variable) for path, variable in flat}
    missing = sorted(
        key
        for key in set(expected) - set(state_dict)
        if not any(re.search(pattern, key) for pattern in allow_missing)
    )
    unexpected = sorted(set(state_dict) - set(expected)) if strict else []
    misshaped, updates = [], {}
    for key, (path, variable) in expected.items():
        if key not in state_dict:
            continue
        value = from_official_array(key, state_dict[key])
        want = tuple(variable[...].shape)
        if key.split(".")[-1] in POS_EMBED_KEYS and value.shape != want and (
            value.ndim == 3 and value.shape[-1] == want[-1]
        ):
            grid = model.encoder.grid_size if isinstance(model, MAE) else model.grid_size
            value = resize_pos_embed(value, grid)
        if tuple(value.shape) != want:
            misshaped.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model "
                             f"{tuple(to_official_array(key, np.zeros(want)).shape)}")
            continue
        updates[path] = value
    if missing or unexpected or misshaped:
        raise fit_error("The checkpoint does not fit the model:", missing, unexpected, misshaped,
                        "Check that the file is of the model variant you built (or let "
                        "mae_jax.load_official infer it from the file).")
    for path, variable in flat:
        if path in updates:
            variable[...] = jnp.asarray(updates[path], dtype=variable[...].dtype)
    nnx.update(model, target)


def load_official(
    path_or_state_dict,
    *,
    model: str = "auto",
    variant: str | None = None,
    known: Mapping | None = None,
    rngs: nnx.Rngs | None = None,
    **overrides,
) -> MAE | ViTEncoder:
    """Builds a model from an official checkpoint; architecture inferred from its shapes.

    model: "auto" (MAE when the file has a decoder, else the encoder alone), "mae" or
    "encoder". variant: optional registry name the file must match (error otherwise).
    known: model arguments a file format records beside the weights (a Hugging Face
    config.json, `recorded`), preferred to what the shapes tell.
    overrides: any model argument, e.g. image_size=256 (position embeddings are interpolated),
    norm_pix_loss=True, dtype=jnp.bfloat16, num_heads for unnamed widths.
    """
    state_dict = read_state_dict(path_or_state_dict)
    config = infer_config(state_dict) | dict(known or {})
    if variant is not None:
        want = VARIANTS.get(variant)
        if want is None:
            raise ValueError(f"Unknown variant {variant!r}; known: {', '.join(VARIANTS)}.")
        got = (config["embed_dim"], config["depth"], config["patch_size"])
        if got != (want.embed_dim, want.depth, want.patch_size):
            raise WeightsError(
                f"The checkpoint is not a {variant}: it has width {got[0]}, depth {got[1]}, "
                f"patch {got[2]} (expected {want.embed_dim}, {want.depth}, {want.patch_size})."
            )
    if model == "auto":
        model = "mae" if has_decoder(state_dict) else "encoder"
    if model not in ("mae", "encoder"):
        raise ValueError(f"model must be 'auto', 'mae' or 'encoder', got {model!r}.")
    config |= overrides
    if "num_heads" not in config:
        raise WeightsError(
            f"Width {config['embed_dim']} / depth {config['depth']} is not a named variant, so "
            "the number of heads cannot be inferred (no weight's shape depends on it): give "
            "it, as num_heads=... in Python or --num_heads with mae_jax.visualize"
        )
    rngs = rngs or make_rngs(0)
    if model == "encoder":
        for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss"):
            config.pop(key, None)
        built = ViTEncoder(**config, rngs=rngs)
        if is_finetuned_classifier(state_dict):
            built.norm = None  # models_vit deletes it for global pooling (fc_norm follows the pool)
    else:
        width = config.get("decoder_embed_dim", DEFAULT_DECODER["decoder_embed_dim"])
        if "decoder_num_heads" not in config and width != DEFAULT_DECODER["decoder_embed_dim"]:
            raise WeightsError(
                f"The decoder is width {width}, not the official 512 (16 heads), and the file "
                "does not record its head count (no weight's shape depends on it): give it, as "
                "decoder_num_heads=... in Python or --decoder_num_heads with mae_jax.visualize")
        built = MAE(**(DEFAULT_DECODER | config), rngs=rngs)
    load_into(built, state_dict, strict=model == "mae")
    return built


def fit_error(title: str, missing, unexpected, misshaped, hint: str) -> WeightsError:
    """One error naming every missing, unexpected and mis-shaped key, then what to do."""
    lines = [title]
    for what, keys, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
                            ("mis-shaped keys", misshaped, "; ")):
        if keys:
            lines.append(f"  {what} ({len(keys)}): {sep.join(keys)}")
    lines.append(hint)
    return WeightsError("\n".join(lines))
