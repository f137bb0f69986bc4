"""Import and export of the official PyTorch MAE checkpoints (`facebookresearch/mae` key layout).

Official files are pickles, read by `mae_jax.weights.pth` with `torch.load(...,
weights_only=True)`, so a file that would run code when unpickled is refused; torch is imported
lazily. An encoder-only load leaves out only an MAE's decoder and a fine-tuned classifier's
fc_norm and head (and says so for the latter); any other weight the model has no place for is an
error, as is NaN or inf in the weights.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.core.errors import WeightsError
from mae_jax.models.layers import FixedEmbedding, make_rngs
from mae_jax.models.mae import MAE
from mae_jax.models.pos_embed import resize_pos_embed
from mae_jax.models.registry import DEFAULT_DECODER, VARIANTS, find_variant
from mae_jax.models.vit import ViTEncoder, check_image_size
from mae_jax.weights.pth import (  # noqa: F401 (re-exported: part of this module's API)
    ARCHITECTURE_KEY,
    _import_torch,
    read_state_dict,
    recorded,
    recorded_architecture,
    safe_torch_load,
)

POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")
_DECODER_NAMES = {"embed": "decoder_embed", "norm": "decoder_norm", "pred": "decoder_pred",
                  "blocks": "decoder_blocks", "pos_embed": "decoder_pos_embed"}
# What an encoder-only load of an official file leaves out: an MAE's decoder, and a fine-tuned
# classifier's pooling norm and head (said in the log). Any other key it has no place for is an
# error (QA: layer-scale gammas, relative-position tables or a misspelt key were dropped).
DECODER_KEYS = (r"^decoder_", r"^mask_token$")
CLASSIFIER_KEYS = (r"^fc_norm\.", r"^head\.")

logger = logging.getLogger(__name__)


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
    if not isinstance(model, MAE | ViTEncoder):
        raise TypeError(f"save_official writes an MAE or a ViT encoder, not a "
                        f"{type(model).__name__}: a classifier goes through mae_jax.classification"
                        ".transfer.save_official_classifier, a segmenter mae_jax.weights.mmseg.")
    torch = _import_torch()
    # Contiguous copies: safetensors and other writers refuse transposed views (QA).
    state = {key: torch.from_numpy(np.array(v, order="C")) for key, v in
             export_official(model).items()}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"model": state, ARCHITECTURE_KEY: recorded_architecture(model)}, tmp)
    os.replace(tmp, path)


def count_blocks(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(ids) + 1 if ids else 0


def infer_config(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Model arguments implied by an official state dict's shapes (heads from the registry)."""
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        segmenter = any(key.startswith(("backbone.", "decode_head.")) for key in state_dict)
        mmseg_backbone = "patch_embed.projection.weight" in state_dict
        raise WeightsError(
            f"Not an official MAE/ViT checkpoint: missing {missing}. Found keys such as "
            f"{sorted(state_dict)[:5]}."
            + (" It is a segmenter (mmseg's layout): segment.py reads it (init_from), as "
               "does mae_jax.weights.mmseg.load_mmseg." if segmenter else "")
            + (" It is an mmseg backbone alone (layers.N, patch_embed.projection: e.g. the "
               "output of mmseg's beit2mmseg converter): start from the original MAE file "
               "(mae_pretrain_vit_*.pth) instead, or from a whole mmseg segmenter checkpoint."
               if mmseg_backbone and not segmenter else "")
        )
    embed_dim = state_dict["cls_token"].shape[-1]
    weight = state_dict["patch_embed.proj.weight"]
    patch_size, in_chans = weight.shape[-1], weight.shape[1]
    depth = count_blocks(state_dict, "blocks")
    positions = state_dict["pos_embed"].shape[1] - 1
    grid = int(round(positions ** 0.5))
    config = {
        "embed_dim": embed_dim,
        "depth": depth,
        "patch_size": patch_size,
        "in_chans": in_chans,
    }
    if grid * grid == positions:  # else the file must record its grid (`load_official` says)
        config["image_size"] = grid * patch_size
    if "blocks.0.mlp.fc1.weight" in state_dict:
        config["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    name = find_variant(embed_dim=embed_dim, depth=depth, patch_size=patch_size)
    if name is not None:
        config["num_heads"] = VARIANTS[name].num_heads
    if "decoder_embed.weight" in state_dict:
        config["decoder_embed_dim"] = state_dict["decoder_embed.weight"].shape[0]
        config["decoder_depth"] = count_blocks(state_dict, "decoder_blocks")
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
    allow_unused: tuple[str, ...] = (),
    source_grid: tuple[int, int] | None = None,
) -> None:
    """Copies official weights into `model` in place.

    Position embeddings of another grid are resized bicubically (official
    `interpolate_pos_embed`). Raises one error naming every missing, unexpected and mis-shaped
    key, and one for weights that hold NaN or inf. `allow_unused`: regexes of checkpoint keys
    the model may lack (e.g. `DECODER_KEYS` when loading an encoder from an MAE file); with
    strict=False, any key the model lacks is ignored. `allow_missing`: regexes of model keys
    that may stay as initialised (e.g. layer-scale gammas the official MAE lacks).
    source_grid: the checkpoint's patch grid (default: square, from its table's length).
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
    unexpected = sorted(
        key for key in set(state_dict) - set(expected)
        if not any(re.search(pattern, key) for pattern in allow_unused)
    ) if strict else []
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
            value = resize_pos_embed(value, grid, old_grid=source_grid)
        if tuple(value.shape) != want:
            misshaped.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model "
                             f"{tuple(to_official_array(key, np.zeros(want)).shape)}")
            continue
        updates[path] = value
    if missing or unexpected or misshaped:
        raise fit_error("The checkpoint does not fit the model:", missing, unexpected, misshaped,
                        "Check that the file is of the model variant you built (or let "
                        "mae_jax.load_official infer it from the file).")
    check_finite({official_key(path): value for path, value in updates.items()},
                 where="the checkpoint")
    for path, variable in flat:
        if path in updates:
            variable[...] = jnp.asarray(updates[path], dtype=variable[...].dtype)
    nnx.update(model, target)


def check_finite(arrays: Mapping[str, np.ndarray], *, where: str) -> None:
    """WeightsError naming the arrays that hold NaN or inf."""
    bad = [name for name, value in arrays.items()
           if np.issubdtype(np.asarray(value).dtype, np.floating)
           and not np.isfinite(value).all()]
    if bad:
        raise WeightsError(
            f"The weights in {where} hold NaN or inf in {len(bad)} array(s): "
            f"{', '.join(bad[:8])}. The file is damaged, or the run that wrote it diverged: use "
            "an earlier checkpoint.")


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
    final_norm = config.pop("final_norm", True) and not is_finetuned_classifier(state_dict)
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
    if model == "mae" and not has_decoder(state_dict):
        raise WeightsError("The checkpoint holds an encoder alone (no decoder_* weights: e.g. "
                           "mae_pretrain_vit_*.pth, or a fine-tuned classifier): load it with "
                           "model='encoder'; the official mae_visualize_vit_*.pth files hold "
                           "the whole MAE.")
    def grid_of(image_size) -> tuple[int, int]:
        return tuple(size // config["patch_size"] for size in
                     check_image_size(image_size, config["patch_size"]))

    # The file's own size, before the caller's.
    source_grid = grid_of(config["image_size"]) if "image_size" in config else None
    config |= overrides
    positions = state_dict["pos_embed"].shape[1] - 1
    if source_grid is None and round(positions ** 0.5) ** 2 != positions:
        if "image_size" in config:  # the caller's: the file's own size, or an error
            grid = grid_of(config["image_size"])
            if grid[0] * grid[1] == positions:  # (review: a transposed size would load too)
                source_grid = grid
                logger.warning("The file does not record its image size: its %d positions are "
                               "read as the %d x %d grid of image_size.", positions, *grid)
        if source_grid is None:
            raise WeightsError(
                f"The position table has {positions} patch positions, not a square grid, and "
                "the file does not record its image size: give it, as image_size=(height, "
                f"width) with height x width / patch_size^2 = {positions} (for another size, "
                "load it at its own, then mae_jax.weights.load.transfer_encoder).")
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
        if not final_norm:  # models_vit deletes it for global pooling (fc_norm follows the pool)
            built.norm = None
        left_out = sorted({key.split(".")[0] for key in state_dict
                           if any(re.search(pattern, key) for pattern in CLASSIFIER_KEYS)})
        if left_out:
            whole = (" The whole fine-tuned classifier: mae_jax.classification.transfer."
                     "load_official_classifier (finetune.py's eval_only)."
                     if is_finetuned_classifier(state_dict) else "")
            logger.warning("The checkpoint is a classifier: its %s %s not part of the encoder "
                           "and left out.%s", " and ".join(left_out),
                           "is" if len(left_out) == 1 else "are", whole)
    else:
        width = config.get("decoder_embed_dim", DEFAULT_DECODER["decoder_embed_dim"])
        if "decoder_num_heads" not in config and width != DEFAULT_DECODER["decoder_embed_dim"]:
            raise WeightsError(
                f"The decoder is width {width}, not the official 512 (16 heads), and the file "
                "does not record its head count (no weight's shape depends on it): give it, as "
                "decoder_num_heads=... in Python or --decoder_num_heads with mae_jax.visualize")
        built = MAE(**(DEFAULT_DECODER | config), rngs=rngs)
    unused = () if model == "mae" else DECODER_KEYS + CLASSIFIER_KEYS
    load_into(built, state_dict, allow_unused=unused, source_grid=source_grid)
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
