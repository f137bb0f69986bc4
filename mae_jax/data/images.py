"""Image pipelines for pretraining, linear probing and fine-tuning (tf.data -> uint8 numpy).

Sources (``folder:PATH``, ``tfds:NAME``) and splits: `mae_jax.data.sources`. Per-image ops
(decode, RandomResizedCrop, bicubic resize, center crop): `mae_jax.data.image_ops`.

Batches hold uint8 pixels; the task libraries normalise them on device inside their jitted
steps with `mae_jax.data.constants.normalize_uint8` (4x fewer bytes than float32 to move).

Training streams are infinite and resumable: batch k depends only on (seed, process, k) (the
shared stream of `mae_jax.data.stream`), and each example's crop, flip and RandAugment come
from stateless ops seeded by it.

Undecodable files never stop a run nor shift the stream (`mae_jax.data.decodable`): training
fills the slot from another file drawn with the example's seed, evaluation masks it out, the
fixed pictures take the next file; each such file is named in the log.
"""

import logging
import math

import numpy as np
import tensorflow as tf

from mae_jax.core.errors import BadDataError
from mae_jax.data import image_ops, sources, tf_runtime  # noqa: F401 - sets TF up
from mae_jax.data import randaugment as randaugment_lib
from mae_jax.data.constants import IMAGENET_MEAN_UINT8
from mae_jax.data.decodable import REPLACEMENTS, Batches, decoded, fill_image, no_autograph
from mae_jax.data.randaugment_program import identity_program, layer_program
from mae_jax.data.sources import class_names, num_classes, num_examples, parse_source
from mae_jax.data.stream import check_process, local_batch_size, shuffled_stream

__all__ = ["Batches", "class_names", "create_eval_iterator", "create_pretrain_iterator",
           "create_train_iterator", "load_fixed_images", "num_classes", "num_examples",
           "parse_source", "shared_classes"]

logger = logging.getLogger(__name__)

CROP_SCALE = (0.2, 1.0)  # official MAE pretraining RandomResizedCrop scale


def _finish(ds: tf.data.Dataset, batch_size: int | None, keys, threads=None) -> tf.data.Dataset:
    """Batches (batch_size None: `ds` already holds batches), keeps `keys` and the decoding
    report, sets a deterministic order and prefetches."""
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda b: {key: b[key] for key in (*keys, "attempts", "failed")})
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = threads
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def shared_classes(*, source: str, splits: tuple[str, str], data_dir: str | None = None,
                   download: bool = True) -> list[str]:
    """The class names of `splits` (train, evaluation), refused unless they are the same: a
    folder split numbers its own sorted class folders, so different sets would silently give
    the same label to different classes."""
    train, other = (class_names(source=source, data_dir=data_dir, split=split,
                                download=download) for split in splits)
    if train != other:
        missing = sorted(set(train) - set(other))
        extra = sorted(set(other) - set(train))
        detail = "; ".join(part for part in (
            f"only in {splits[0]!r}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            if missing else "",
            f"only in {splits[1]!r}: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}"
            if extra else "") if part)
        raise BadDataError(
            f"{source}: splits {splits[0]!r} and {splits[1]!r} hold different classes "
            f"({len(train)} and {len(other)} class folders; {detail}). Labels are positions in "
            "the sorted class list, so they would not match: give both splits the same class "
            "folders.")
    return train


def _check_size(image_size: int) -> None:
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}.")


# -------------------------------------------------------------------- Iterators


def create_train_iterator(
    *, source: str, image_size: int, global_batch_size: int, seed: int, split: str = "train",
    start_step: int = 0, data_dir: str | None = None, download: bool = True,
    shuffle_buffer_size: int = 50_000, crop_scale=CROP_SCALE, with_labels: bool = False,
    randaugment: str | None = None, process_index: int | None = None,
    process_count: int | None = None, center_crop: bool = False, threads: int | None = None,
    device_resize_canvas: int = 0, crop_clipped: bool = False,
) -> Batches:
    """Infinite, resumable iterator of {"image": uint8 [B, S, S, 3], "label": int32 [B] (only
    with_labels)}, B = global_batch_size // process_count, S = image_size.

    Per example: RandomResizedCrop(S, scale=crop_scale, ratio (3/4, 4/3), bicubic) + horizontal
    flip (crop_clipped: the linear probe's boxes, `image_ops.crop_box`), then RandAugment on
    the uint8 crop when `randaugment` is a timm string such as "rand-m9-mstd0.5-inc1" (the
    official fine-tuning order; normalising and random erasing happen on device).
    center_crop=True replaces crop and flip by resize + center crop (no randomness).
    `start_step=k` yields what a fresh iterator yields from its k-th batch on.
    threads: size of a private tf.data thread pool (None: TF's shared one, all cores).
    `shuffle_buffer_size` bounds the per-epoch shuffle of TFDS records; a folder's listing is
    fully permuted every epoch (`stream.shuffled_stream`).
    Process arguments default to jax.process_index() / jax.process_count().

    device_resize_canvas=C > 0: the host only decodes each crop window and pads it into a C x C
    canvas; batches are {"canvas": uint8 [B, C, C, 3], "box": int32 [B, 4], "flip": bool [B]}
    and `mae_jax.data.device_resize.CanvasResizeIterator` resizes and flips them on the devices
    (the same images to rounding; the bicubic resize is ~60% of the host's time per image).
    Windows larger than C are resized on the host. With RandAugment the host only draws each
    example's layers ("ra_code" int32 [B, L], "ra_args" float32 [B, L, 6],
    `mae_jax.data.randaugment_program`) and the devices apply them after the resize (the
    host path's draws; pixels to rounding). Not with center_crop.
    """
    process_index, process_count = check_process(process_index, process_count)
    batch = local_batch_size(global_batch_size, process_count)
    _check_size(image_size)
    if device_resize_canvas:
        if device_resize_canvas < image_size:
            raise ValueError(f"device_resize_canvas {device_resize_canvas} must be 0 (resize on "
                             f"the host) or >= image_size {image_size}.")
        if center_crop:
            raise ValueError("device_resize_canvas needs the random crop + flip: center_crop "
                             "runs on the host; set it to 0.")
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop_scale {tuple(crop_scale)} must satisfy 0 < low <= high <= 1.")
    augment_layers = None
    if randaugment:
        augment_layers = randaugment_lib.parse_rand_augment(randaugment)
    shard = sources.local_shard(source, split, data_dir=data_dir, download=download,
                                process_index=process_index, process_count=process_count,
                                with_labels=with_labels, equal=True)

    def transform(encoded, seed):
        if center_crop:
            return image_ops.resize_center_crop(encoded, image_size, resize_ratio=1.0)
        crop_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if device_resize_canvas:
            window = image_ops.random_crop_window(encoded, crop_seed, image_size,
                                                  device_resize_canvas, (low, high),
                                                  crop_clipped)
            if augment_layers is not None:  # the draws here, the ops on the devices
                window.update(layer_program(augment_seed, image_size, **augment_layers))
            return window
        image = image_ops.random_resized_crop(encoded, crop_seed, image_size, (low, high),
                                              crop_clipped)
        if augment_layers is not None:
            image = randaugment_lib.rand_augment(image, augment_seed, **augment_layers)
        return image

    stream = shuffled_stream(
        shard.records, num_records=shard.count, batch_size=batch, seed=seed,
        process_index=process_index, start_step=start_step,
        shuffle_buffer_size=shuffle_buffer_size, what=shard.what, indices=shard.paths is not None,
    )
    fill, keys = fill_image(image_size, IMAGENET_MEAN_UINT8), ("image",)
    if device_resize_canvas:  # the mean colour, kept as it is by the device resize
        fill = {"canvas": fill_image(device_resize_canvas, IMAGENET_MEAN_UINT8),
                "box": tf.constant([0, 0, image_size, image_size], tf.int32),
                "flip": tf.constant(False)}
        keys = ("canvas", "box", "flip")
        if augment_layers is not None:
            fill.update(identity_program(augment_layers["num_layers"]))
            keys = (*keys, "ra_code", "ra_args")
    pad = {"canvas": [device_resize_canvas] * 2 + [3]} if device_resize_canvas else None
    # One decoding block per batch: no unbatch / batch copies (~0.2 ms an image with canvases).
    ds = decoded(stream, shard, transform, replacements=REPLACEMENTS, fill=fill, pad=pad,
                 block=batch, batches=True)
    keys = (*keys, "label") if with_labels else keys
    outcome = ("its slot is filled by another image" if shard.paths is not None
               else "its slot is filled by another example of its batch")
    return Batches(_finish(ds, None, keys, threads), what=shard.what, outcome=outcome)


def create_pretrain_iterator(
    *, source: str, image_size: int, global_batch_size: int, seed: int,
    data_dir: str | None = None, split: str = "train", start_step: int = 0,
    process_index: int | None = None, process_count: int | None = None, download: bool = True,
    augment: bool = True, shuffle_buffer_size: int = 50_000, device_resize_canvas: int = 0,
) -> Batches:
    """Unlabelled `create_train_iterator` with MAE's pretraining crop scale (0.2, 1);
    augment=False: resize + center crop instead of the random crop and flip."""
    return create_train_iterator(
        source=source, image_size=image_size, global_batch_size=global_batch_size, seed=seed,
        split=split, start_step=start_step, data_dir=data_dir, download=download,
        shuffle_buffer_size=shuffle_buffer_size, process_index=process_index,
        process_count=process_count, center_crop=not augment,
        device_resize_canvas=device_resize_canvas,
    )


def create_eval_iterator(
    *, source: str, image_size: int, global_batch_size: int, split: str,
    data_dir: str | None = None, download: bool = True, resize_ratio: float = 224 / 256,
    process_index: int | None = None, process_count: int | None = None,
) -> Batches:
    """ONE pass over this process's shard of `split`: {"image": uint8 [B, S, S, 3], "label":
    int32 [B], "mask": bool [B]}, B = global_batch_size // process_count.

    The official eval transform: resize the shorter side to int(S / resize_ratio) (256 for 224),
    bicubic, center crop S. Shards differ in size by at most one; every process pads its last
    batches (mask False, label 0, black image) up to ceil(ceil(total / processes) / B) batches,
    a number each process computes from the global count alone, so all run the same number of
    steps without talking to each other. A file that does not decode is masked out (and named).
    """
    process_index, process_count = check_process(process_index, process_count)
    batch = local_batch_size(global_batch_size, process_count)
    _check_size(image_size)
    if not 0 < resize_ratio <= 1:
        raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio}.")
    shard = sources.local_shard(source, split, data_dir=data_dir, download=download,
                                process_index=process_index, process_count=process_count,
                                with_labels=True, equal=False)
    num_batches = math.ceil(math.ceil(shard.total / process_count) / batch)

    def transform(encoded, seed):
        del seed  # no randomness at evaluation
        return image_ops.resize_center_crop(encoded, image_size, resize_ratio)

    examples = tf.data.Dataset.zip(tf.data.Dataset.from_tensors(tf.zeros([2], tf.int64)).repeat(),
                                   shard.records)
    ds = decoded(examples, shard, transform, replacements=0, fill=fill_image(image_size, (0, 0, 0)))
    padding = {"image": fill_image(image_size, (0, 0, 0)), "label": tf.constant(0),
               "attempts": tf.constant(0), "valid": tf.constant(False),
               "failed": tf.constant([""])}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(num_batches * batch)
    ds = ds.map(lambda example: {**example, "mask": example["valid"]})
    return Batches(_finish(ds, batch, ("image", "label", "mask")), what=shard.what,
                   num_batches=num_batches, outcome="left out of the metrics (not counted)")


def load_fixed_images(*, source: str, image_size: int, count: int, data_dir: str | None = None,
                      split: str | None = None, download: bool = True) -> np.ndarray:
    """`count` images spread evenly over a split, resized + center cropped: uint8 [count, S, S,
    3]. The same on every process (picture i is example i * total // count of the whole split,
    so a class-sorted dataset shows many classes). An undecodable pick is named in the log and
    replaced by the next example that decodes. split=None: TFDS "test", else "validation",
    else "train"; folders val/, else train/ (or the folder itself).
    """
    _check_size(image_size)
    kind, name = parse_source(source)
    if kind == "tfds":
        builder = sources.tfds_builder(name, data_dir, download)
        if split is None:
            split = next((s for s in ("test", "validation", "train") if s in builder.info.splits),
                         "train")
        total = sources.tfds_count(builder, split)
    else:
        directory = sources.split_folder(name, split)
        total = sources.list_folder(directory, with_labels=False).total
    if total < count:
        raise ValueError(f"{source} has {total} example(s), fewer than count={count}")
    tries = min(REPLACEMENTS + 1, total)
    picks = [i * total // count for i in range(count)]
    # Each pick's candidates: itself, then the examples after it (wrapping around).
    if kind == "folder":
        wanted = [(pick + j) % total for pick in picks for j in range(tries)]
        paths = sources.folder_paths_at(directory, wanted, with_labels=False)
        candidates = tf.data.Dataset.from_tensor_slices(
            {"name": tf.constant(paths)}).batch(tries)
    else:
        candidates = _tfds_runs(builder, split, picks, tries, total).batch(tries)

    @no_autograph
    def first(group):
        @no_autograph
        def attempt(t):
            encoded = (tf.io.read_file(group["name"][t]) if kind == "folder"
                       else group["encoded"][t])
            return t, image_ops.resize_center_crop(encoded, image_size, resize_ratio=1.0)

        decoded = tf.data.Dataset.range(tries).map(attempt).ignore_errors()
        fallback = (tf.constant(tries, tf.int64), fill_image(image_size, (0, 0, 0)))
        found = decoded.concatenate(tf.data.Dataset.from_tensors(fallback)).take(1)
        return found.map(lambda t, image: (t, image, group["name"]))

    results = list(candidates.interleave(first, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True).as_numpy_iterator())
    for tried, _, names in results:
        names = [n.decode() for n in names]
        if tried == tries:
            raise BadDataError(f"None of {names} decodes (files tried for one of the fixed "
                               f"pictures): check the data of {source}.")  # QA: a traceback
        for bad in names[:tried]:
            logger.warning("Undecodable image %s: the fixed pictures use %s instead.", bad,
                           names[tried])
    return np.stack([image for _, image, _ in results])


def _tfds_runs(builder, split: str, starts, length: int, total: int) -> tf.data.Dataset:
    """Records start .. start+length-1 (mod total) of a TFDS split for each start, in order."""
    records = None
    runs = []
    for start in starts:
        end = start + length
        if "[" in split:  # already sliced: no slice arithmetic on top, read through
            if records is None:
                records = sources.tfds_records(builder, split).repeat(2)
            runs.append(records.skip(start).take(length))
            continue
        parts = [f"{split}[{start}:{min(end, total)}]"]
        if end > total:
            parts.append(f"{split}[0:{end - total}]")
        runs.append(sources.tfds_records(builder, "+".join(parts)).take(length))
    dataset = runs[0]
    for run in runs[1:]:
        dataset = dataset.concatenate(run)
    return dataset
