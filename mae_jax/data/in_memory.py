"""A whole image split decoded once into one uint8 numpy array, for the on-device input
(`mae_jax.data.on_device`), and the choice between that input and the tf.data pipeline.

Same sources and order as the pipeline (`mae_jax.data.sources`: ``tfds:NAME`` with a split,
``folder:PATH``) and the same decoder (`image_ops.decode_rgb`: 3 channels, PIL's JPEG DCT), so
both inputs see the same pixels. Only datasets whose images all have one size fit in an
[N, H, W, 3] array; undecodable files are left out (logged).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import tensorflow as tf

from mae_jax.core import config as core_config
from mae_jax.core.errors import BadDataError
from mae_jax.data import (
    image_ops,
    sources,
    tf_runtime,  # noqa: F401 - sets TensorFlow up (imported for that)
)

logger = logging.getLogger(__name__)


def fixed_image_shape(*, source: str, data_dir: str | None = None, split: str = "train",
                      download: bool = True, max_bytes: float = math.inf):
    """(N, H, W, 3) of the decoded split when all its images have one size, else None.

    Nothing is decoded: TFDS answers from its feature shape (None when it is not fixed, e.g.
    ImageNet), folders from image headers. A folder whose first image already says that the
    array would exceed `max_bytes` is answered (N, H0, W0, 3) without opening the others.
    """
    kind, name = sources.parse_source(source)
    if kind == "tfds":
        builder = sources.tfds_builder(name, data_dir, download)
        height, width, _ = builder.info.features[sources.image_key(builder)].shape
        if height is None or width is None:
            return None
        return (sources.tfds_count(builder, split), height, width, 3)
    files = sources.list_folder(sources.split_folder(name, split), with_labels=False).paths
    sizes = (size for size in map(_header_size, files) if size is not None)
    first = next(sizes, None)  # files PIL cannot identify are skipped (the decoder drops them)
    if first is None:
        return None
    width, height = first
    shape = (len(files), height, width, 3)
    if math.prod(shape) > max_bytes:
        return shape
    return shape if all(size == first for size in sizes) else None


def _header_size(path) -> tuple[int, int] | None:
    """(width, height) from the image header, None for a file PIL cannot identify."""
    from PIL import Image

    try:
        with Image.open(path) as image:  # the header only
            return image.size
    except OSError:  # PIL.UnidentifiedImageError included
        return None


def load_image_array(*, source: str, data_dir: str | None = None, split: str = "train",
                     download: bool = True, with_labels: bool = False):
    """The whole split, decoded: uint8 [N, H, W, 3], in the sources' fixed order; with_labels:
    (images, int32 labels [N]) of a labelled split (class folders or the TFDS ``label``).

    Raises ValueError naming two sizes when the images do not share one size.
    """
    shard = sources.local_shard(source, split, data_dir=data_dir, download=download,
                                process_index=0, process_count=1, with_labels=with_labels,
                                equal=True)

    def decode(record):
        if shard.paths is not None:  # folder: records index the paths
            image = image_ops.decode_rgb(tf.io.read_file(tf.gather(shard.paths, record)))
            label = tf.gather(shard.labels, record)
        else:
            image, label = image_ops.decode_rgb(record["encoded"]), record["label"]
        return (image, label) if with_labels else image

    decoded = shard.records.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True).ignore_errors(log_warning=True)
    chunks = []
    try:  # batching is fast, and fails at the first image of another size
        for chunk in decoded.batch(4096).as_numpy_iterator():
            chunks.append(chunk)
    except tf.errors.InvalidArgumentError:
        sizes = []
        for element in decoded.as_numpy_iterator():
            image = element[0] if with_labels else element
            if image.shape not in sizes:
                sizes.append(image.shape)
            if len(sizes) == 2:
                break
        raise BadDataError(
            f"{shard.what} has images of different sizes, e.g. {sizes}; the on-device input "
            "needs one size. Use config.data.on_device='never' (tf.data) for this dataset."
        ) from None
    if not chunks:
        raise BadDataError(f"could not decode any image of {shard.what}.")
    if with_labels:
        array, labels = (np.concatenate(part) for part in zip(*chunks, strict=True))
    else:
        array, labels = np.concatenate(chunks), None
    if len(array) != shard.count:
        logger.warning("Decoded %d of %d images of %s; the undecodable ones are left out.",
                       len(array), shard.count, shard.what)
    return (array, labels.astype(np.int32)) if with_labels else array


def device_memory_bytes(devices) -> int | None:
    """The smallest memory limit of this process's `devices` (another host's devices cannot be
    asked); None where the backend does not say (CPU)."""
    import jax

    local = [d for d in devices if getattr(d, "process_index", 0) == jax.process_index()]
    limits = [(device.memory_stats() or {}).get("bytes_limit") for device in local]
    return None if not limits or None in limits else int(min(limits))


def use_on_device(mode: str, *, source: str, devices, data_dir: str | None = None,
                  split: str = "train", download: bool = True, max_fraction: float = 0.25) -> bool:
    """Whether to keep the decoded split on the devices (config.data.on_device).

    "never": False. "always": True, or a clear error when the images differ in size or the
    copy would take more than `max_fraction` of a device's memory. "auto": the same checks
    answered with False, and True only on accelerators (on CPU the host is the device and
    tf.data stays). Every process decides alike (same data, same kind of devices).
    """
    if mode not in core_config.ON_DEVICE_MODES:
        raise ValueError(f"config.data.on_device must be one of {core_config.ON_DEVICE_MODES}, "
                         f"got {mode!r}.")
    if mode == "never" or (mode == "auto" and devices[0].platform == "cpu"):
        return False  # on CPU the host is the device: tf.data stays (nothing to inspect)
    limit = device_memory_bytes(devices)
    budget = math.inf if limit is None else max_fraction * limit
    shape = fixed_image_shape(source=source, data_dir=data_dir, split=split,
                              download=download, max_bytes=budget)
    if shape is None:
        if mode == "auto":
            return False
        raise BadDataError(
            f"config.data.on_device='always' needs images of one size, but {source} (split "
            f"{split!r}) has images of several sizes (or a TFDS feature without a fixed shape). "
            "Use on_device='auto' or 'never'."
        )
    if math.prod(shape) > budget:
        if mode == "auto":
            return False
        raise BadDataError(
            f"the decoded dataset {shape} takes {math.prod(shape) / 2**30:.2f} GiB per device, "
            f"more than {max_fraction:.0%} of the {limit / 2**30:.1f} GiB a device has; use "
            "on_device='never' (tf.data) for it."
        )
    return mode == "always" or devices[0].platform != "cpu"
