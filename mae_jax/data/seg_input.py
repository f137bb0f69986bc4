"""Segmentation input pipelines: ADE20K or synthetic scenes -> uint8 image and label batches.

Train batches come from the shared resumable stream of `mae_jax.data.stream` (batch k depends
only on (seed, process, k)); each example's augmentation is seeded by it through stateless ops.
Images stay uint8 up to the batch; the task normalises them on device
(`mae_jax.data.constants.normalize_uint8`). JPEGs decode with the accurate DCT, as OpenCV (mmseg's
decoder) and PIL do.
"""

import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.data import (
    ade20k,
    image_ops,
    seg_transforms,
    synthetic_scenes,
    tf_runtime,  # noqa: F401 - sets TensorFlow up (imported for that)
)
from mae_jax.data.ade20k_meta import ADE20K_CLASSES
from mae_jax.data.constants import IMAGENET_MEAN_UINT8
from mae_jax.data.decodable import Batches, no_autograph
from mae_jax.data.photometric import neutral_params
from mae_jax.data.seg_sources import (  # noqa: F401 - num_seg_classes: part of this API
    SYNTHETIC_NUM_CLASSES,
    check_source,
    num_seg_classes,
)
from mae_jax.data.stream import check_process, local_batch_size, shuffled_stream

# Synthetic scenes: fast to generate (about 10 ms a 64x64 scene).
SYNTHETIC_IMAGE_SIZE = (64, 64)
SYNTHETIC_NUM_EXAMPLES = {"train": 1024, "validation": 64}


def split_records(
    source,
    split,
    *,
    data_dir,
    manual_dir,
    num_classes,
    image_size,
    num_examples,
    scene_seed,
    process_index,
    process_count,
    drop_remainder,
):
    """This process's records of a split, cheap to skip and shuffle, plus a decode function.

    Returns (records dataset, number of records, decode, name) where decode(record) gives
    {"image": uint8 [H, W, 3], "label": uint8 [H, W] raw, "name": string} (decode(record,
    keep_encoded=True): the image's bytes where it has them, for `train_transform` to decode
    only its crop) and name(record) the name alone (without decoding).
    """
    check_source(source, num_classes)
    if source == "ade20k":
        builder = ade20k.load_ade20k_builder(data_dir=data_dir, manual_dir=manual_dir)
        split_name = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[
            process_index
        ]
        features = builder.info.features
        # Records keep their JPEG / PNG bytes until after skip and shuffle.
        records = builder.as_dataset(
            split=split_name,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()},
        )
        size = builder.info.splits[split_name].num_examples

        def decode(record, keep_encoded=False):
            label = features["label"].decode_example(record["label"])[..., 0]
            # A raw value past the last class would be a NaN loss, not an error: this example
            # fails (training: its slot is filled and it is named; evaluation: an error).
            in_range = tf.debugging.assert_less_equal(
                tf.reduce_max(label), tf.constant(len(ADE20K_CLASSES), tf.uint8),
                message="ADE20K label values must be 0..150")
            with tf.control_dependencies([in_range]):
                label = tf.identity(label)
            return {
                # TFDS's own decoder uses TF's default (fast, inexact) JPEG DCT.
                "image": record["image"] if keep_encoded else image_ops.decode_rgb(record["image"]),
                "label": label,
                "name": record["file_name"],
            }

        return records, size, decode, lambda record: record["file_name"]

    num_classes = SYNTHETIC_NUM_CLASSES if num_classes is None else num_classes
    synthetic_scenes.check_num_classes(num_classes)  # now, not inside the tf.data graph
    total = SYNTHETIC_NUM_EXAMPLES[split] if num_examples is None else num_examples
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    # Validation scenes come from another seed so they are never training scenes.
    split_seed = scene_seed * 2 + (split == "validation")
    indices = list(range(process_index, total, process_count))
    if drop_remainder:
        indices = indices[: total // process_count]

    def generate(index):
        return synthetic_scenes.generate_scene(
            int(index), num_classes=num_classes, image_size=(height, width), seed=split_seed
        )

    def name(index):
        return tf.strings.join(
            [f"synthetic_{split}_", tf.strings.as_string(index, width=5, fill="0")]
        )

    def decode(index, keep_encoded=False):
        del keep_encoded  # generated scenes have no encoded form
        # Scenes are generated on demand: scene i depends only on (seed, i).
        image, label = tf.numpy_function(generate, [index], (tf.uint8, tf.uint8), stateful=False)
        return {
            "image": tf.ensure_shape(image, [height, width, 3]),
            "label": tf.ensure_shape(label, [height, width]),
            "name": name(index),
        }

    records = tf.data.Dataset.from_tensor_slices(tf.constant(indices, tf.int64))
    return records, len(indices), decode, name


def create_seg_train_iterator(
    *,
    source,
    global_batch_size,
    crop_size,
    seed,
    data_dir=None,
    start_step=0,
    process_index=None,
    process_count=None,
    scale=(2048, 512),
    ratio_range=(0.5, 2.0),
    manual_dir=None,
    num_classes=None,
    image_size=SYNTHETIC_IMAGE_SIZE,
    num_examples=None,
    scene_seed=0,
    cat_max_ratio=0.75,
    flip=True,
    photometric=True,
    shuffle_buffer=4096,
    threads=None,
    device_photometric=False,
):
    """Infinite iterator of this process's train batches, mmseg's ADE20K train pipeline.

    source: "ade20k" (data_dir = prepared TFDS dir; manual_dir prepares it if needed) or
    "synthetic" (num_classes, image_size, num_examples, scene_seed configure the scenes).
    Yields {"image": uint8 [B, crop, crop, 3] (padding: the mean colour), "label": uint8
    [B, crop, crop] (255 = ignore; the loss casts it on device)} with B = global_batch_size /
    process_count. start_step=k yields what a fresh iterator yields from its k-th batch on.
    threads: size of a private tf.data thread pool (None: TF's shared one, all cores).
    device_photometric=True (with photometric): the photometric distortion is left to the
    accelerator; batches also hold "photometric": float32 [B, 9], its parameters, for
    `mae_jax.data.photometric.apply_photometric` (which gives the host path's images exactly).
    An image or label that does not decode (a truncated file: TFDS keeps the bytes it was given)
    costs only its slot, filled with the mean colour and every pixel ignored (nothing for the
    loss); it is named in a warning (`Batches.undecodable`), and the stream, hence exact resume,
    does not change.
    """
    process_index, process_count = check_process(process_index, process_count)
    local_batch = local_batch_size(global_batch_size, process_count)
    records, size, decode, name = split_records(
        source,
        "train",
        data_dir=data_dir,
        manual_dir=manual_dir,
        num_classes=num_classes,
        image_size=image_size,
        num_examples=num_examples,
        scene_seed=scene_seed,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=True,
    )
    stream = shuffled_stream(
        records, num_records=size, batch_size=local_batch, seed=seed,
        process_index=process_index, start_step=start_step,
        shuffle_buffer_size=shuffle_buffer, what=f"{source} training split",
    )

    def transform(example_seed, record):
        example = decode(record, keep_encoded=True)
        out = seg_transforms.train_transform(
            example["image"],
            example["label"],
            seed=example_seed,
            crop_size=crop_size,
            scale=scale,
            ratio_range=ratio_range,
            cat_max_ratio=cat_max_ratio,
            flip=flip,
            photometric=photometric,
            device_photometric=device_photometric,
        )
        return dict(zip(("image", "label", "photometric"), out, strict=False))

    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    mean = tf.constant(IMAGENET_MEAN_UINT8, tf.uint8)
    fill = {"image": tf.broadcast_to(mean, [crop_h, crop_w, 3]),
            "label": tf.fill([crop_h, crop_w], tf.constant(seg_transforms.IGNORE_INDEX, tf.uint8))}
    if photometric and device_photometric:  # nothing to distort: every step off
        fill["photometric"] = tf.constant(neutral_params(crop_h, crop_w), tf.float32)

    @no_autograph
    def decode_batch(seeds, records):
        """One batch, each example on its own so that an undecodable file (raising inside the
        transform) costs only its slot: the fill, every pixel ignored (the stream, hence exact
        resume, is unchanged). One map instance per batch, not per example."""
        size = tf.shape(seeds)[0]
        examples = tf.data.Dataset.from_tensor_slices((tf.range(size), seeds, records))
        done = examples.map(no_autograph(lambda j, seed, record: (j, transform(seed, record))))
        done = done.ignore_errors()
        # The fill closes the batch: failed slots point at it.
        positions, got = done.concatenate(tf.data.Dataset.from_tensors(
            (tf.constant(-1), fill))).batch(local_batch + 1).get_single_element()
        found = tf.shape(positions)[0] - 1
        slot = tf.tensor_scatter_nd_update(tf.fill([size], found), positions[:found, None],
                                           tf.range(found))
        batch = tf.cond(found == size, lambda: {k: v[:size] for k, v in got.items()},
                        lambda: {k: tf.gather(v, slot) for k, v in got.items()})
        failed = slot == found
        batch["attempts"] = tf.cast(failed, tf.int32)
        batch["failed"] = tf.where(failed, name(records), "")[:, None]  # names: elementwise
        return batch

    dataset = stream.batch(local_batch, drop_remainder=True).map(
        decode_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = threads
    return Batches(dataset.with_options(options).prefetch(2), what=f"{source} training split",
                   outcome="its slot is filled by the mean colour with every pixel ignored",
                   kind="Unusable training pair (a damaged image or label file, a label map of "
                        "another size than its image, or a label value past 150)")
