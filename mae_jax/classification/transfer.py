"""Classifier weights in and out: `init_from` into the sharded state, and the official
`models_vit.VisionTransformer` layout (`mae_finetuned_vit_*.pth`) both ways.

Official fine-tuned files hold the encoder keys (`cls_token`, `pos_embed`, `patch_embed.*`,
`blocks.*`) plus `fc_norm.*` and `head.*`, and no final `norm` (global pooling deletes it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.core.errors import WeightsError
from mae_jax.models.classifier import ViTClassifier
from mae_jax.models.factory import ModelSpec, encoder_of
from mae_jax.models.layers import make_rngs
from mae_jax.models.pos_embed import resize_pos_embed
from mae_jax.models.registry import find_variant
from mae_jax.weights import official
from mae_jax.weights.load import check_heads, copy_encoder_from, load_model, source_kind

# ----------------------------------------------------------------------- official layout


def export_official_classifier(model: ViTClassifier) -> dict[str, np.ndarray]:
    """{official key: float32 numpy in PyTorch layout} of a fine-tuning classifier."""
    if not model.global_pool:
        raise ValueError(
            "Only the fine-tuning classifier (global_pool=True) has an official .pth layout "
            "(mae_finetuned_vit_*.pth); export a linear probe with save_export instead."
        )
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = official.official_key(path)
        out[key] = official.to_official_array(key, np.asarray(variable.get_value()))
    return out


def save_official_classifier(model: ViTClassifier, path: str) -> str:
    """Writes `{"model": state_dict}` as the official main_finetune.py saves it (atomically)."""
    import torch

    state = {key: torch.from_numpy(np.array(value, order="C"))
             for key, value in export_official_classifier(model).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": state}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def is_official_classifier(state_dict: Mapping[str, np.ndarray]) -> bool:
    return "head.weight" in state_dict and "fc_norm.weight" in state_dict


def load_official_classifier(
    path_or_state_dict, *, image_size: int | None = None, **overrides
) -> ViTClassifier:
    """A fine-tuning classifier from an official `mae_finetuned_vit_*.pth` (or its state dict).

    Sizes come from the shapes (heads from the registry, else `num_heads=`); image_size
    (default: the file's) resizes the position embedding bicubically.
    """
    state_dict = official.read_state_dict(path_or_state_dict)
    if not is_official_classifier(state_dict):
        raise ValueError(
            "Not an official fine-tuned classifier: it lacks head.weight / fc_norm.weight (a "
            "pretrained encoder such as mae_pretrain_vit_base.pth goes to init_from instead)."
        )
    dims = official.infer_config(state_dict) | overrides
    if "num_heads" not in dims:
        raise WeightsError(
            f"Width {dims['embed_dim']} is not a named variant, so the head count cannot be "
            "inferred (no weight's shape depends on it): pass num_heads=..."
        )
    variant = find_variant(embed_dim=dims["embed_dim"], depth=dims["depth"],
                           patch_size=dims["patch_size"]) or "vit_base_patch16"
    file_size = dims.pop("image_size", None)
    if file_size is None and image_size is None:
        raise WeightsError("The classifier's position table is not a square grid: give its "
                           "image size, image_size=(height, width).")
    model = ViTClassifier(
        variant=variant, image_size=image_size or file_size,
        num_classes=state_dict["head.weight"].shape[0], global_pool=True, rngs=make_rngs(0),
        **dims,
    )
    values = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = official.official_key(path)
        if key not in state_dict:
            raise ValueError(f"The checkpoint lacks {key}: is it a models_vit classifier?")
        value = official.from_official_array(key, state_dict[key])
        want = tuple(variable.get_value().shape)
        if key == "pos_embed" and value.shape != want:
            value = resize_pos_embed(value, model.encoder.grid_size)
        if value.shape != want:
            raise ValueError(f"{key}: checkpoint {value.shape} vs model {want}.")
        values[path] = value
    _set_values(model, values)
    return model


# ----------------------------------------------------------------------- init_from


def load_classifier(path: str, *, spec: ModelSpec, step: int | None = None
                    ) -> ViTClassifier | None:
    """The whole classifier at `path` (an official fine-tuned .pth, a finetune.py / linprobe.py
    run directory or export) when it has the architecture of `spec`; None when `path` holds
    only an encoder (a pretrained MAE). step: a run directory's checkpoint (default: newest)."""
    target = nnx.eval_shape(spec.build)
    if source_kind(path) == "official":
        state_dict = official.read_state_dict(os.path.expanduser(path))
        if not is_official_classifier(state_dict):
            return None
        model = load_official_classifier(
            state_dict, image_size=target.encoder.image_size[0],
            num_heads=target.encoder.blocks[0].attn.num_heads,
        )
    else:
        model = load_model(path, step=step)
        if not isinstance(model, ViTClassifier):
            return None
        check_heads(model, target)
    mine = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(target))}
    theirs = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model))}
    if mine != theirs:
        differ = sorted(".".join(map(str, p)) for p in set(mine) ^ set(theirs)
                        | {p for p in set(mine) & set(theirs) if mine[p] != theirs[p]})
        raise WeightsError(
            f"The classifier in {path} does not fit this config (classes, pooling or model "
            f"size differ): {', '.join(differ[:6])}. Evaluate it with its own config, or "
            "fine-tune from it (finetune.py without eval_only: the encoder is copied, the "
            "head starts fresh; a linear probe needs a pretrained encoder)."
        )
    return model


def encoder_values(path: str, spec: ModelSpec, step: int | None = None
                   ) -> dict[tuple, np.ndarray]:
    """{model path: array} of the encoder at `path`, fitted to `spec`'s encoder (position
    embedding resized; keys the target lacks, such as `norm` for global pooling, dropped)."""
    target = encoder_of(nnx.eval_shape(spec.build))
    copied = set(copy_encoder_from(path, target, step=step))
    return {("encoder", *p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(target)) if p in copied}


def model_values(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _set_values(model: nnx.Module, values: Mapping[tuple, np.ndarray]) -> None:
    state = nnx.state(model)
    for path, variable in nnx.to_flat_state(state):
        if path in values:
            variable.set_value(jnp.asarray(values[path], variable.get_value().dtype))
    nnx.update(model, state)
