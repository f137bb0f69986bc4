"""What a weights path holds: a run directory (or one of its checkpoints), a Flax export, or
an official .pth file / Hugging Face ViTMAE folder. Nothing is read beyond names and markers."""

from __future__ import annotations

import os

from mae_jax.core.errors import DataNotFoundError, WeightsError
from mae_jax.models.factory import MODEL_JSON
from mae_jax.weights import hf

EXPORT_WEIGHTS = "weights"
RUN_CHECKPOINTS = "checkpoints"


def run_checkpoint(path: str | os.PathLike) -> tuple[str, int | None]:
    """One checkpoint of a run directory, `<run>/checkpoints/<step>` -> (<run>, step); any
    other path -> (path, None). (QA: only a run's newest checkpoint could be started from.)"""
    path = os.path.expanduser(os.fspath(path))
    parent, name = os.path.split(os.path.abspath(path))
    run, folder = os.path.split(parent)
    if name.isdigit() and folder == RUN_CHECKPOINTS and os.path.isdir(path) and os.path.exists(
            os.path.join(run, MODEL_JSON)):
        return run, int(name)
    return path, None


def source_kind(path: str | os.PathLike) -> str:
    """"run" (a run directory, or one of its checkpoints), "export" (a Flax export) or
    "official" (an official .pth file, or a Hugging Face ViTMAE folder / file)."""
    path = os.path.expanduser(os.fspath(path))
    if run_checkpoint(path)[1] is not None:
        return "run"
    if not os.path.exists(path):
        raise DataNotFoundError(
            f"No checkpoint at {path}: give an official .pth file, a Hugging Face ViTMAE folder "
            "(downloaded first: Hub names such as facebook/vit-mae-base are not fetched), a "
            "train.py / segment.py run directory or a Flax export folder.")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, MODEL_JSON)):
        if os.path.isdir(os.path.join(path, RUN_CHECKPOINTS)):
            return "run"
        if os.path.isdir(os.path.join(path, EXPORT_WEIGHTS)):
            return "export"
    if os.path.isdir(path):
        if hf.is_hf_checkpoint(path):
            return "official"
        inside = sorted(name for name in os.listdir(path)  # what `<run>/export` holds
                        if os.path.exists(os.path.join(path, name, MODEL_JSON))
                        or name.endswith(".pth") and os.path.isfile(os.path.join(path, name)))
        raise WeightsError(
            f"{path} is a directory but neither a run directory (model.json + checkpoints/), "
            "a Flax export (model.json + weights/) nor a Hugging Face ViTMAE folder "
            "(config.json + model.safetensors): point at a train.py / segment.py workdir, a "
            "Flax export folder (a run's export/encoder_flax or export/classifier_flax), an "
            "HF folder or an official .pth file."
            + (f" Here: {', '.join(os.path.join(path, name) for name in inside)}."
               if inside else "")
        )
    return "official"
