"""Image datasets for pretraining (tf.data): deterministic, resumable, sharded per process.

Sources are strings:
  * ``"tfds:NAME"``: any TFDS image dataset; NAME is passed to ``tfds.builder`` as is, so it may
    carry a config and version (``"tfds:cifar100"``, ``"tfds:imagenet2012:5.1.0"``). The split is
    the separate ``split`` argument (TFDS split syntax, e.g. ``"train[:90%]"``), not part of the
    string, because ``:`` already means "version" in TFDS names.
  * ``"folder:/path/to/images"``: every .jpg/.jpeg/.png below the folder (recursive, any case);
    ``split`` is ignored (the folder is the split).

Determinism and resumption: the shared stream of `mae_jax.data.stream` (batch ``k`` depends only
on (seed, process, k)); each example's crop and flip come from stateless ops seeded by it.

Corrupt folder images: a validation pass at start-up opens every file with PIL (header + ``verify``,
no pixel decoding), skips the unreadable ones and logs their count with examples. Files that pass
it but still fail TF decoding are dropped by ``ignore_errors`` (logged by tf.data) so that a run
never crashes mid-way.
"""

import functools
import logging
import math
import os
from concurrent import futures
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.data.constants import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.data.stream import check_process, local_batch_size, shuffled_stream

try:  # Keep TensorFlow off accelerators: JAX owns them.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices elsewhere; nothing to do.
    pass

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CROP_SCALE = (0.2, 1.0)  # official MAE RandomResizedCrop scale
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10  # torchvision's number of attempts before the center-crop fallback
_SOURCE_FORMS = '"tfds:NAME" (e.g. "tfds:cifar100") or "folder:/path/to/images"'


class Source(NamedTuple):
    kind: str  # "tfds" or "folder"
    name: str  # TFDS name (with optional /config:version) or folder path


def parse_source(source: str) -> Source:
    """Parses "tfds:NAME" or "folder:PATH"; anything else raises ValueError."""
    kind, sep, name = source.partition(":") if isinstance(source, str) else ("", "", "")
    if not sep or kind not in ("tfds", "folder") or not name.strip():
        raise ValueError(f"bad data source {source!r}: expected {_SOURCE_FORMS}")
    return Source(kind, name.strip())


# ---------------------------------------------------------------- Folder source


@functools.lru_cache(maxsize=8)
def _readable_folder_images(path: str) -> tuple[str, ...]:
    """Sorted readable image files below `path`; unreadable ones are skipped, counted, logged."""
    from PIL import Image  # PIL ships with TFDS/matplotlib; only the folder source needs it.

    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist (source 'folder:{path}')")
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )

    def readable(file: str) -> bool:
        try:
            with Image.open(file) as image:
                image.verify()  # parses the whole file (chunk CRCs for PNG) without decoding
            return True
        except Exception:  # noqa: BLE001 - any failure means "skip this file"
            return False

    with futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool:
        ok = list(pool.map(readable, files, chunksize=256))
    bad = [f for f, good in zip(files, ok, strict=True) if not good]
    if bad:
        logger.warning(
            "Skipping %d unreadable image file(s) of %d in %s, e.g. %s",
            len(bad), len(files), path, bad[:5],
        )
    good = tuple(f for f, good in zip(files, ok, strict=True) if good)
    if not good:
        raise ValueError(
            f"no readable {'/'.join(IMAGE_EXTENSIONS)} images in folder {path!r} "
            f"({len(files)} candidate file(s), {len(bad)} unreadable); point the source at a "
            "folder of images"
        )
    return good


# ------------------------------------------------------------------ TFDS source


def _tfds_builder(name: str, data_dir: str | None, download: bool):
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    where = builder.data_dir
    how_to = (
        f"On a machine with internet run `tfds build {name.split(':')[0]} --data_dir DIR`, copy "
        "DIR to this machine and pass --config.data.data_dir=DIR."
    )
    if not download:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {where} and download=False. {how_to}"
        )
    try:
        builder.download_and_prepare()
    except Exception as error:
        raise RuntimeError(
            f"could not download/prepare TFDS dataset {name!r} into {where}: {error}. {how_to}"
        ) from error
    return builder


def _image_key(builder) -> str:
    features = builder.info.features
    if "image" in features:
        return "image"
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            return key
    raise ValueError(f"TFDS dataset {builder.name!r} has no image feature: {list(features)}")


def _tfds_encoded(builder, split) -> tf.data.Dataset:
    """Encoded image bytes of `split`, in a fixed order; decoding happens later, in parallel."""
    key = _image_key(builder)
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={key: tfds.decode.SkipDecoding()}
    )
    return ds.map(lambda example: example[key])


def _count(ds: tf.data.Dataset, builder, split) -> int:
    cardinality = int(ds.cardinality())
    # TFDS records the split size as the cardinality; fall back to the metadata otherwise.
    return cardinality if cardinality >= 0 else builder.info.splits[split].num_examples


# ------------------------------------------------------------- Local records


class _Records(NamedTuple):
    records: tf.data.Dataset  # file paths (folder) or encoded image bytes (TFDS), fixed order
    count: int  # number of records
    from_folder: bool  # records are paths that still need reading


def _local_records(source, data_dir, split, process_index, process_count, download) -> _Records:
    """This process's shard; shards are equal in size so every process runs the same steps."""
    kind, name = parse_source(source)
    if kind == "folder":
        files = _readable_folder_images(os.path.abspath(os.path.expanduser(name)))
        per_process = len(files) // process_count
        local = list(files[process_index::process_count][:per_process])
        paths = tf.data.Dataset.from_tensor_slices(tf.constant(local, tf.string))
        return _Records(paths, per_process, True)
    builder = _tfds_builder(name, data_dir, download)
    local_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    records = _tfds_encoded(builder, local_split)
    return _Records(records, _count(records, builder, local_split), False)


def num_examples(
    *, source: str, data_dir: str | None = None, split: str = "train", download: bool = True
) -> int:
    """Examples in the whole split (all processes); folders count only readable images.

    Prepares (downloads) a TFDS dataset first if needed and `download` is true.
    """
    kind, name = parse_source(source)
    if kind == "folder":
        return len(_readable_folder_images(os.path.abspath(os.path.expanduser(name))))
    builder = _tfds_builder(name, data_dir, download)
    return _count(_tfds_encoded(builder, split), builder, split)


# ------------------------------------------------------------------ Transforms


def _decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """encoded: JPEG/PNG bytes -> [H, W, 3] uint8; grayscale is replicated, alpha dropped."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _crop_box(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor):
    """torchvision RandomResizedCrop.get_params, with all tries drawn at once (stateless).

    Returns (top, left, crop_height, crop_width) as int32 scalars.
    """
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    area = h * w * tf.random.stateless_uniform([CROP_TRIES], seeds[0], *CROP_SCALE)
    log_ratio = tf.random.stateless_uniform(
        [CROP_TRIES], seeds[1], math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    )
    aspect = tf.exp(log_ratio)
    # tf.round and Python's round both round half to even.
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    valid = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    # torch.randint(0, h - crop_h + 1) as a floor of a uniform draw.
    top = tf.floor(tf.random.stateless_uniform([CROP_TRIES], seeds[2]) * (h - crop_h + 1))
    left = tf.floor(tf.random.stateless_uniform([CROP_TRIES], seeds[3]) * (w - crop_w + 1))
    first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)

    # Fallback when no try fits: central crop with the aspect ratio clamped to CROP_RATIO.
    in_ratio = w / h
    fallback_w = tf.where(in_ratio > CROP_RATIO[1], tf.round(h * CROP_RATIO[1]), w)
    fallback_h = tf.where(in_ratio < CROP_RATIO[0], tf.round(w / CROP_RATIO[0]), h)
    fallback = tf.stack([(h - fallback_h) // 2, (w - fallback_w) // 2, fallback_h, fallback_w])
    chosen = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])
    box = tf.where(tf.reduce_any(valid), chosen, fallback)
    return tuple(tf.unstack(tf.cast(box, tf.int32)))


def _resize(image: tf.Tensor, size) -> tf.Tensor:
    """Bicubic resize as PIL does it (torchvision applies it to PIL images), clipped to [0, 255].

    Upsampling uses TF's plain bicubic kernel (Keys a=-0.5, half-pixel centers: PIL's filter when
    enlarging, 8x faster than the antialiased op); antialiasing only when a side shrinks.
    """
    shrinks = tf.reduce_any(tf.shape(image)[:2] > tf.convert_to_tensor(size))
    resized = tf.cond(
        shrinks,
        lambda: tf.image.resize(image, size, method="bicubic", antialias=True),
        lambda: tf.image.resize(image, size, method="bicubic", antialias=False),
    )
    return tf.clip_by_value(resized, 0.0, 255.0)  # bicubic overshoots; PIL saturates


_SCALE = tuple(1 / (255 * s) for s in IMAGENET_STD)
_OFFSET = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))


def _normalize(image: tf.Tensor) -> tf.Tensor:
    """[0, 255] -> (x / 255 - mean) / std as one multiply-add: this runs at full resolution."""
    return image * tf.constant(_SCALE) + tf.constant(_OFFSET)


def _augment(image: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """RandomResizedCrop(scale (0.2, 1), ratio (3/4, 4/3), bicubic) + flip p=0.5 + normalise.

    image: [H, W, 3] uint8 -> [image_size, image_size, 3] float32.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(image)
    top, left, crop_h, crop_w = _crop_box(crop_seed, shape[0], shape[1])
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, 3]))
    # Flipping the small crop before resizing is cheaper, and equal: the resize is symmetric.
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    crop = tf.cond(flip, lambda: tf.image.flip_left_right(crop), lambda: crop)
    return _normalize(_resize(crop, [image_size, image_size]))


def _center(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resize the shorter side to image_size (torchvision Resize), center crop, normalise.

    image: [H, W, 3] uint8 -> [image_size, image_size, 3] float32.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    # torchvision: shorter side = size, longer side = int(size * long / short) (truncated).
    new_hw = tf.cast(tf.floor(shape * image_size / tf.reduce_min(shape)), tf.int32)
    new_hw = tf.maximum(new_hw, image_size)
    resized = _resize(image, new_hw)
    top = tf.cast(tf.round(tf.cast(new_hw[0] - image_size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_hw[1] - image_size, tf.float32) / 2), tf.int32)
    crop = tf.image.crop_to_bounding_box(resized, top, left, image_size, image_size)
    return _normalize(crop)


def _preprocess_fn(records: _Records, image_size: int, augment: bool):
    def preprocess(seed, record):
        encoded = tf.io.read_file(record) if records.from_folder else record
        image = _decode_rgb(encoded)
        if augment:
            return _augment(image, seed, image_size)
        return _center(image, image_size)

    return preprocess


def _finish(ds: tf.data.Dataset, records: _Records, batch_size: int) -> tf.data.Dataset:
    if records.from_folder:
        # Safety net for files that passed the PIL check but fail TF decoding: drop, don't crash.
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size, drop_remainder=True).map(lambda images: {"image": images})
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


# -------------------------------------------------------------------- Iterators


def create_pretrain_iterator(
    *,
    source: str,
    image_size: int,
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    split: str = "train",
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    download: bool = True,
    augment: bool = True,
    shuffle_buffer_size: int = 50_000,
):
    """Infinite iterator of {"image": float32 [global_batch_size // process_count, S, S, 3]}.

    ImageNet-normalised; batches are identical for identical (seed, step); see the module
    docstring for how resumption from `start_step` works. `shuffle_buffer_size` bounds the
    per-epoch shuffle (a full shuffle when the shard is smaller); it holds encoded records.
    Defaults for the process arguments come from jax.process_index() / jax.process_count().
    """
    process_index, process_count = check_process(process_index, process_count)
    batch = local_batch_size(global_batch_size, process_count)
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}.")
    records = _local_records(source, data_dir, split, process_index, process_count, download)
    ds = shuffled_stream(
        records.records, num_records=records.count, batch_size=batch, seed=seed,
        process_index=process_index, start_step=start_step,
        shuffle_buffer_size=shuffle_buffer_size, what=f"{source} split {split!r}",
    )
    preprocess = _preprocess_fn(records, image_size, augment)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(ds, records, batch).as_numpy_iterator()


def load_fixed_images(
    *,
    source: str,
    image_size: int,
    count: int,
    data_dir: str | None = None,
    split: str | None = None,
    download: bool = True,
) -> np.ndarray:
    """The first `count` examples, un-augmented and normalised: float32 [count, S, S, 3].

    Same on every process. For TFDS, `split=None` picks "test", else "validation", else "train".
    """
    kind, name = parse_source(source)
    if kind == "tfds" and split is None:
        splits = _tfds_builder(name, data_dir, download).info.splits
        split = next((s for s in ("test", "validation", "train") if s in splits), "train")
    records = _local_records(source, data_dir, split or "train", 0, 1, download)
    if records.count < count:
        raise ValueError(f"{source} has {records.count} example(s), fewer than count={count}")
    ds = records.records.take(count).map(lambda record: (tf.constant([0, 0], tf.int64), record))
    ds = ds.map(_preprocess_fn(records, image_size, augment=False), tf.data.AUTOTUNE)
    if records.from_folder:
        ds = ds.ignore_errors(log_warning=True)
    images = list(ds.as_numpy_iterator())
    if len(images) != count:  # a file failed TF decoding after passing the PIL check
        raise ValueError(f"could only decode {len(images)} of {count} images from {source}")
    return np.stack(images).astype(np.float32)
