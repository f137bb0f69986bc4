"""Load a model, or only its encoder, from whatever a user has, restoring parameters only.

    load_model(path)      an official .pth (architecture from its shapes), a Hugging Face
                          ViTMAE folder, a run directory of train.py / segment.py (its newest
                          checkpoint) or a Flax export
    load_encoder(path)    the ViT encoder of any of those
    transfer_encoder(source, target)   copies one encoder's weights into another (Flax to Flax,
                          position embeddings resized to the target grid)

`load_official` reads official .pth files and Hugging Face ViTMAE checkpoints. A run directory
or Flax export holds `model.json` (the model's `ModelSpec`); a run directory's
checkpoint is read without its optimizer state.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.core.checkpointing import Checkpointer, read_pytree, save_pytree
from mae_jax.core.errors import DataNotFoundError, WeightsError
from mae_jax.core.processes import failing_together, from_process_0
from mae_jax.models.factory import ModelSpec, encoder_of
from mae_jax.models.pos_embed import resize_pos_embed
from mae_jax.models.vit import ViTEncoder
from mae_jax.weights import hf, hf_keys, official
from mae_jax.weights.kinds import EXPORT_WEIGHTS, run_checkpoint, source_kind


def load_model(
    path: str | os.PathLike, *, step: int | None = None, **overrides
) -> nnx.Module:
    """The model stored at `path`, on the host.

    step: a run directory's checkpoint step (default: the one `path` names, <run>/checkpoints/
    <step>, else the newest). overrides: for official files, the arguments
    `mae_jax.load_official` takes (model="mae"/"encoder", num_heads, ...); for a run or an
    export, model="encoder" alone (its encoder).
    """
    kind = source_kind(path)
    given, (path, named) = path, run_checkpoint(path)
    if step is not None and (kind != "run" or named not in (None, step)):
        raise ValueError(f"step={step}: {given} is " + (
            f"checkpoint {named} of its run; give the run directory with step=, or that "
            "checkpoint's folder alone" if kind == "run" else "one set of weights (steps are a "
            "run directory's checkpoints)") + ".")  # QA: it was ignored without a word
    step = named if step is None else step
    if kind == "official":
        return load_official(path, **overrides)
    part = overrides.pop("model", None)
    refused = sorted(overrides) + ([f"model={part!r}"] if part not in (None, "encoder") else [])
    if refused:
        raise ValueError(
            f"{path} records its architecture in model.json: {', '.join(refused)} only for "
            "official checkpoint files (model='encoder' gives its encoder; mae_jax.weights.load"
            ".transfer_encoder copies it into an encoder of another image size).")
    spec = ModelSpec.load(path)
    if kind == "run":
        with Checkpointer(path, async_save=False) as checkpointer:
            steps = checkpointer.all_steps()
            if not steps or (step is not None and step not in steps):
                raise DataNotFoundError(
                    f"No finished checkpoint of step {step} in {checkpointer.directory}; it holds "
                    f"{steps}." if steps else f"No finished checkpoint in "
                    f"{checkpointer.directory}: the run has not saved one yet.")
            arrays = checkpointer.restore_model_arrays(step)
        flat = {**_flatten(arrays.get("params", {})), **_flatten(arrays.get("rest", {}))}
    else:
        flat = _flatten(read_pytree(os.path.join(path, EXPORT_WEIGHTS)))
    model = spec.build()
    _assign(model, flat, where=path)
    return encoder_of(model) if part == "encoder" else model


def newest_step_everywhere(path: str | os.PathLike) -> int | None:
    """For a run of several processes starting from `path` (`init_from`): a run directory's
    newest intact checkpoint step as process 0 finds it, the same on every process; None for
    any other source. Each process finding its own could give the hosts different weights
    (a source run still saving commits a newer step between their readings)."""
    path = os.path.expanduser(os.fspath(path))
    if source_kind(path) != "run":
        return None
    path, named = run_checkpoint(path)
    if named is not None:  # that one, on every process
        return named

    def newest() -> int:
        with Checkpointer(path, async_save=False) as checkpointer:
            step = checkpointer.newest_intact_step()
        return -1 if step is None else step

    step = from_process_0(newest, f"finding the newest checkpoint in {path}")
    return None if step < 0 else step


def describe(path, step: int | None) -> str:
    """`path`, with the checkpoint step a run directory gave (for the log: QA, which of a
    run's checkpoints an init_from used was never said)."""
    return f"{path} (its checkpoint of step {step})" if step is not None else str(path)


def load_official(path_or_state_dict, **kwargs) -> nnx.Module:
    """A model from an official MAE checkpoint (`mae_*_vit_*.pth`, or its state dict) or a
    Hugging Face ViTMAE checkpoint (`facebook/vit-mae-*`: a folder with config.json and
    model.safetensors / pytorch_model.bin, or the weights file alone).

    kwargs: see `mae_jax.weights.official.load_official` (model="mae"/"encoder", variant,
    image_size, num_heads for unnamed sizes, dtype, ...).
    """
    state_dict, known = read_official(path_or_state_dict)
    known |= kwargs.pop("known", None) or {}
    return official.load_official(state_dict, known=known, **kwargs)


def read_official(path_or_state_dict) -> tuple[dict[str, np.ndarray], dict]:
    """An official / Hugging Face checkpoint -> (official state dict, what the file records
    beside its weights: head counts, image size, norm_pix_loss, ...; see `load_official`)."""
    source = path_or_state_dict
    if isinstance(source, str | os.PathLike) and hf.is_hf_checkpoint(source):
        return hf.read_hf(source)
    if isinstance(source, str | os.PathLike) and source_kind(source) != "official":
        raise WeightsError(f"{source} is a run directory or a Flax export, not an official "
                           "checkpoint: load it with mae_jax.load_model.")
    if isinstance(source, str | os.PathLike):
        source = official.safe_torch_load(source)
    state_dict = official.read_state_dict(source)
    if hf_keys.is_hf_state_dict(state_dict):  # e.g. a lone HF pytorch_model.bin
        state_dict = hf_keys.hf_to_official(state_dict)
    return state_dict, official.recorded(source)


def load_encoder(path: str | os.PathLike, **overrides) -> ViTEncoder:
    """The ViT encoder of whatever `path` holds (an MAE, an encoder, a segmenter, ...)."""
    if source_kind(path) == "official":
        overrides.setdefault("model", "encoder")
    return encoder_of(load_model(path, **overrides))


def save_export(model: nnx.Module, spec: ModelSpec, directory: str) -> str:
    """A Flax export that `load_model` reads back: `model.json` + `weights/` (all model state)."""
    os.makedirs(directory, exist_ok=True)
    save_pytree(os.path.join(directory, EXPORT_WEIGHTS), nnx.state(model), force=True)
    with failing_together(f"writing {directory}/model.json"):
        if jax.process_index() == 0:
            spec.save(directory)
    return directory


def transfer_encoder(
    source: ViTEncoder, target: ViTEncoder, *, allow_missing: tuple[str, ...] = (),
    allow_unused: tuple[str, ...] = (r"^norm\.",),
) -> list[tuple]:
    """Copies `source`'s weights into `target` in place; returns the paths copied.

    Position embeddings of another grid are resized bicubically (official
    `interpolate_pos_embed`). `allow_missing`: regexes of target paths the source may lack
    (they keep their values); `allow_unused`: of source paths the target may lack (the final
    norm, which global pooling replaces). Any other missing, extra (a deeper encoder, trained
    layer-scale or relative-position weights) or mis-shaped weight is one clear error.
    """
    sizes = [(model.embed_dim, model.patch_size, model.depth) for model in (source, target)]
    if sizes[0][:2] != sizes[1][:2]:
        (width, patch, depth), (want_width, want_patch, want_depth) = sizes
        raise WeightsError(
            f"The source encoder is width {width}, patch {patch}, depth {depth}; the model is "
            f"width {want_width}, patch {want_patch}, depth {want_depth}. Build the model at the "
            "source's size (config model.variant, or model.embed_dim / depth / num_heads / "
            "patch_size), or start from weights of this size."
        )
    values = {
        _key(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(source))
    }
    table = values.get(("pos_embed",))
    if table is not None and table.shape[1:] != (1 + target.num_patches, target.embed_dim):
        values[("pos_embed",)] = resize_pos_embed(table, target.grid_size,
                                                  old_grid=source.grid_size)
    missing = [
        key for path, _ in nnx.to_flat_state(nnx.state(target))
        if (key := _key(path)) not in values
        and not any(re.search(pattern, ".".join(key)) for pattern in allow_missing)
    ]
    if missing and source.norm is None and all(key[0] == "norm" for key in missing):
        raise WeightsError(
            "The source encoder has no final norm: it is a fine-tuned classifier (global "
            "pooling deletes `norm`), and this model reads the cls token after that norm (the "
            "linear probe). Start from the pretrained encoder instead (mae_pretrain_vit_*.pth "
            "or the train.py run), or fine-tune with global pooling."
        )
    if missing:
        raise WeightsError(
            f"The source encoder lacks {len(missing)} weight(s) of the target: "
            f"{', '.join('.'.join(k) for k in missing[:8])}. Is it the same model size?"
        )
    wanted = {_key(path) for path, _ in nnx.to_flat_state(nnx.state(target))}
    unused = [name for name in (".".join(key) for key in values if key not in wanted)
              if not any(re.search(pattern, name) for pattern in allow_unused)]
    if unused:
        raise WeightsError(
            f"The source encoder has {len(unused)} trained weight(s) the target has no place "
            f"for: {', '.join(unused[:8])}. Is it the same model size and kind (depth, "
            "layer scale, relative position bias)? Build the target to match, or start from "
            "a checkpoint of this model."
        )
    return _assign(target, values, where="the source encoder", strict=False)


def check_heads(source: nnx.Module, target: nnx.Module) -> None:
    """WeightsError when two models' encoders (a source that records its architecture, and the
    model it is loaded into) have other attention head counts: no weight's shape depends on
    it, so the weights would load without a word and compute another attention."""
    have, want = (encoder_of(model).blocks[0].attn.num_heads if len(encoder_of(model).blocks)
                  else None for model in (source, target))
    if have and want and have != want:
        raise WeightsError(
            f"The source encoder has {have} attention heads, the model {want} (no weight's "
            f"shape tells them apart): set model.num_heads={have}, or start from weights of "
            "this model.")


def copy_encoder_from(
    path: str | os.PathLike, target: ViTEncoder, *, allow_missing: tuple[str, ...] = (),
    step: int | None = None,
) -> list[tuple]:
    """`transfer_encoder` from the encoder at `path` (anything `load_encoder` reads) into
    `target` (what `init_from` does); returns the paths copied. Errors name `path`.

    The head count is checked where the source records it (a run, a Flax export, a `.pth`
    this code wrote, a Hugging Face config). The official files do not: no weight's shape
    depends on it and the source only lends its weights, so one head reads them. step: a run
    directory's checkpoint (default: its newest; `newest_step_everywhere` for a run of
    several processes).
    """
    path = os.path.expanduser(os.fspath(path))
    try:
        recorded_heads = True
        if source_kind(path) == "official":
            state_dict, known = read_official(path)
            recorded_heads = "num_heads" in known
            source = official.load_official(state_dict, known=known, model="encoder",
                                            **({} if recorded_heads else {"num_heads": 1}))
        else:
            source = load_encoder(path, step=step)
        same_size = (source.embed_dim, source.patch_size) == (target.embed_dim,
                                                              target.patch_size)
        if recorded_heads and same_size:  # else transfer_encoder names the sizes
            check_heads(source, target)
        return transfer_encoder(source, target, allow_missing=allow_missing)
    except WeightsError as error:
        raise WeightsError(f"Cannot start from {path}: {error}") from None


def _key(path: tuple) -> tuple[str, ...]:
    return tuple(str(part) for part in path)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
    """Nested dicts -> {path of str: array}; the 'value' level of nnx Variables is dropped."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (str(name),)))
        else:
            out[prefix if name == "value" else prefix + (str(name),)] = value
    return out


def _assign(model: nnx.Module, flat: dict, *, where: str, strict: bool = True) -> list[tuple]:
    """Writes `flat` values into the model's variables of the same path and shape."""
    state = nnx.state(model)
    copied, missing, misshaped, nonfinite = [], [], [], {}
    for path, variable in nnx.to_flat_state(state):
        key = _key(path)
        if key not in flat:
            missing.append(".".join(key))
            continue
        value, current = np.asarray(flat[key]), variable.get_value()  # may be abstract
        if value.shape != tuple(current.shape):
            misshaped.append(f"{'.'.join(key)}: {value.shape} vs {tuple(current.shape)}")
            continue
        if np.issubdtype(value.dtype, np.floating):
            nonfinite[".".join(key)] = value
        variable.set_value(jnp.asarray(value, dtype=current.dtype))
        copied.append(path)
    if (missing and strict) or misshaped:
        raise WeightsError(
            f"The weights in {where} do not fit the model: "
            + "; ".join(
                part for part in (
                    f"missing {', '.join(missing[:8])}" if missing and strict else "",
                    f"mis-shaped {', '.join(misshaped[:8])}" if misshaped else "",
                ) if part
            )
        )
    official.check_finite(nonfinite, where=where)
    nnx.update(model, state)
    return copied
