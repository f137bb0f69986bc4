"""A k-NN monitor of the representation during pretraining (InstDisc / DINO's weighted k-NN).

Every N steps the encoder embeds a fixed labelled subset: a memory bank from the train split and
queries from the validation split (un-augmented: resize + centre crop). Features are the cls
token after the encoder's final norm (the token the linear probe reads), L2-normalised. Each
query takes its k most cosine-similar bank entries; neighbour j votes for its class with weight
exp(sim_j / T); the class with the largest vote is the prediction (k = 20, T = 0.07 as in
InstDisc and DINO's `knn_classifier`). Top-1 goes to metrics.jsonl / TensorBoard as an "eval"
record (`knn_top1`, with the seconds it took).

The subsets are read once, when the hook is made, and kept on the host as uint8.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mae_jax.core import sharding as sharding_lib
from mae_jax.core.errors import BadDataError, BadInputError
from mae_jax.core.processes import failing_together
from mae_jax.core.run_logging import RunLogger
from mae_jax.models.factory import encoder_of


def knn_scores(
    queries: jax.Array, bank: jax.Array, bank_labels: jax.Array, *, num_classes: int,
    k: int = 20, temperature: float = 0.07,
) -> jax.Array:
    """Weighted k-NN votes [Q, num_classes].

    queries [Q, D], bank [N, D]: L2-normalised features; bank_labels [N] int. Vote of class c
    = sum over the k nearest neighbours j of class c of exp(sim_j / temperature).
    """
    similarity = queries @ bank.T  # [Q, N] cosine similarities
    top_similarity, top_index = jax.lax.top_k(similarity, min(k, bank.shape[0]))
    weights = jnp.exp(top_similarity / temperature)  # [Q, k]
    votes = jax.nn.one_hot(bank_labels[top_index], num_classes, dtype=weights.dtype)  # [Q,k,C]
    return jnp.einsum("qk,qkc->qc", weights, votes)


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load_labelled_subset(
    *, source: str, split: str, count: int, image_size: int, data_dir: str | None,
    download: bool, batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, S, S, 3], int32 [n]), resized + centre cropped, the same on every process.

    Spread over the split: the loaders' shard 0 of stride = ceil(size / count) shards, i.e.
    every stride-th image of a (class-sorted) folder and the first 1/stride of a TFDS split
    (which TFDS stores shuffled); n = ceil(size / stride), between count / 2 and count (all of
    a split smaller than count)."""
    from mae_jax.data import images as data  # TensorFlow: input pipeline only

    size = data.num_examples(source=source, data_dir=data_dir, split=split, download=download,
                             with_labels=True)
    stride = math.ceil(size / count)
    images, labels = [], []
    for batch in data.create_eval_iterator(
        source=source, image_size=image_size, global_batch_size=batch_size * stride,
        split=split, data_dir=data_dir, download=download, process_index=0,
        process_count=stride,
    ):
        keep = np.asarray(batch["mask"], bool)
        images.append(np.asarray(batch["image"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
        if sum(len(x) for x in labels) >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count].astype(np.int32)


class FeatureExtractor:
    """The encoder's L2-normalised cls features of a host uint8 array, computed in global
    batches sharded over the mesh (every process holds the same array)."""

    def __init__(self, graphdef: nnx.GraphDef, mesh, *, batch_size: int):
        from mae_jax.data.constants import normalize_uint8

        self.batch_size = batch_size
        self.batch_sharding = sharding_lib.batch_sharding(mesh)

        def features(params, rest, images):
            model = nnx.merge(graphdef, params, rest)
            return l2_normalize(encoder_of(model)(normalize_uint8(images))["cls"])

        self.features = jax.jit(features, out_shardings=sharding_lib.replicated(mesh))

    def __call__(self, state, images: np.ndarray) -> jax.Array:
        """images uint8 [n, S, S, 3] -> [n, D] float32 (replicated)."""
        count, processes = len(images), jax.process_count()
        padded = math.ceil(count / self.batch_size) * self.batch_size
        images = np.concatenate([images, np.zeros((padded - count, *images.shape[1:]),
                                                  images.dtype)])
        local = self.batch_size // processes
        start = jax.process_index() * local
        out = []
        for offset in range(0, padded, self.batch_size):
            chunk = images[offset + start: offset + start + local]
            batch = sharding_lib.global_batch_from_host({"image": chunk}, self.batch_sharding)
            out.append(self.features(state.params, state.rest, batch["image"]))
        return jnp.concatenate(out)[:count]


def make_knn_hook(
    knn: ml_collections.ConfigDict, *, graphdef: nnx.GraphDef, mesh, logger: RunLogger | None,
    source: str, image_size: int, data_dir: str | None = None, download: bool = True,
    workdir: str | None = None, seed: int = 0,
) -> Callable[[int, object], dict[str, float]]:
    """A `loop.Hook` function `(step, state) -> {"knn_top1", "knn_seconds"}` for a model whose
    encoder `mae_jax.models.factory.encoder_of` finds (an MAE, a classifier). knn.source
    `generated:N` writes its labelled images into `workdir` (as finetune.py's demo data)."""
    from mae_jax.classification.synthetic import resolve_labelled_source
    from mae_jax.data import images as data

    source = knn.source or source
    started = time.perf_counter()
    try:
        if workdir is not None:  # generated:N -> 8 classes of textures (N // 4 queries)
            try:
                source = resolve_labelled_source(ml_collections.ConfigDict({
                    "source": source, "train_split": knn.train_split,
                    "eval_split": knn.eval_split, "generated_classes": 8,
                    "generated_size": image_size}), workdir, seed=seed)
            except ValueError as error:  # the generated data's own checks
                raise BadDataError(str(error)) from None
        options = {"source": source, "image_size": image_size, "data_dir": data_dir,
                   "download": download, "batch_size": knn.batch_size}
        bank_images, bank_labels = load_labelled_subset(split=knn.train_split,
                                                        count=knn.num_train, **options)
        query_images, query_labels = load_labelled_subset(split=knn.eval_split,
                                                          count=knn.num_eval, **options)
        num_classes = len(data.shared_classes(source=source, data_dir=data_dir,
                                              download=download,
                                              splits=(knn.train_split, knn.eval_split)))
    except BadInputError as error:
        raise type(error)(
            f"k-NN monitor (config.knn) on {source}: {error}. Give it labelled data with "
            "knn.source (tfds:NAME, folder:PATH of class sub-folders, or generated:N), or turn "
            "it off with knn.every_steps=0") from None
    print(f"k-NN monitor: {len(bank_labels)} bank and {len(query_labels)} query images of "
          f"{num_classes} classes from {source}, read in {time.perf_counter() - started:.1f}s.")
    extract = FeatureExtractor(graphdef, mesh, batch_size=knn.batch_size)
    bank_labels_device = jnp.asarray(bank_labels)
    query_labels_device = jnp.asarray(query_labels)

    @jax.jit
    def top1(queries, bank):
        scores = knn_scores(queries, bank, bank_labels_device, num_classes=num_classes,
                            k=knn.k, temperature=knn.temperature)
        return 100.0 * jnp.mean(scores.argmax(-1) == query_labels_device)

    def hook(step: int, state) -> dict[str, float]:
        started = time.perf_counter()
        accuracy = float(top1(extract(state, query_images), extract(state, bank_images)))
        record = {"knn_top1": accuracy, "knn_seconds": time.perf_counter() - started}
        if logger is not None:
            with failing_together(f"writing the k-NN accuracy of step {step}"):  # process 0
                logger.log_eval(step, record)
        return record

    return hook
