"""Models described as data: a class name plus JSON-able constructor arguments.

Every run directory and Flax export stores the `ModelSpec` of its model in `model.json`, so the
weights can be loaded back (`mae_jax.weights.load`) without the config or the task library
that trained them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mae_jax.models.classifier import ViTClassifier
from mae_jax.models.layers import make_rngs
from mae_jax.models.mae import MAE
from mae_jax.models.segmenter import MAESegmenter
from mae_jax.models.vit import ViTEncoder

MODEL_JSON = "model.json"
MODEL_CLASSES: dict[str, type[nnx.Module]] = {
    "MAE": MAE,
    "ViTEncoder": ViTEncoder,
    "MAESegmenter": MAESegmenter,
    "ViTClassifier": ViTClassifier,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """`kind` names a class of MODEL_CLASSES; `kwargs` are its constructor arguments, with the
    compute dtype as a name ("float32", "bfloat16")."""

    kind: str
    kwargs: dict[str, Any]

    def __post_init__(self):
        if self.kind not in MODEL_CLASSES:
            raise ValueError(
                f"Unknown model kind {self.kind!r}; known: {', '.join(MODEL_CLASSES)}."
            )

    def build(self, rngs: nnx.Rngs | None = None) -> nnx.Module:
        kwargs = dict(self.kwargs)
        if "dtype" in kwargs:
            kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
        for name, value in kwargs.items():
            if isinstance(value, list):  # JSON has no tuples
                kwargs[name] = tuple(value)
        return MODEL_CLASSES[self.kind](**kwargs, rngs=rngs or make_rngs(0))

    def save(self, directory: str) -> None:
        path = os.path.join(directory, MODEL_JSON)
        with open(path + ".tmp", "w") as handle:
            json.dump({"kind": self.kind, "kwargs": self.kwargs}, handle, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, directory: str) -> ModelSpec:
        with open(os.path.join(directory, MODEL_JSON)) as handle:
            data = json.load(handle)
        return cls(data["kind"], data["kwargs"])


def encoder_of(model: nnx.Module) -> ViTEncoder:
    """The ViT encoder inside any of our models."""
    if isinstance(model, ViTEncoder):
        return model
    for name in ("encoder", "backbone"):
        encoder = getattr(model, name, None)
        if isinstance(encoder, ViTEncoder):
            return encoder
    raise ValueError(f"{type(model).__name__} has no ViT encoder.")
