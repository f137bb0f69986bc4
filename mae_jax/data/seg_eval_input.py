"""Segmentation evaluation input: mmseg's test pipeline one validation example at a time, and
the check that every validation pair decodes (and fits its image) before a run trains.
"""

import tensorflow as tf

from mae_jax.core.errors import BadDataError
from mae_jax.data import seg_transforms
from mae_jax.data.decodable import no_autograph
from mae_jax.data.seg_input import SYNTHETIC_IMAGE_SIZE, split_records


def seg_eval_examples(
    *,
    source,
    data_dir=None,
    scale=(2048, 512),
    limit=None,
    manual_dir=None,
    num_classes=None,
    image_size=SYNTHETIC_IMAGE_SIZE,
    num_examples=None,
    scene_seed=0,
    process_index=0,
    process_count=1,
):
    """Validation examples one at a time, mmseg's test pipeline.

    Yields {"image": uint8 [h, w, 3] resized to fit `scale`, "label": int32
    [H, W] at the ORIGINAL size (reduced, 255 = ignore), "name": str}. limit keeps the first
    `limit` examples; process_index / process_count split them without overlap (default: all).
    An example that does not decode (or whose label map is not its image's size) raises
    BadDataError naming it (training skips such files, evaluation cannot without changing the
    metrics).
    """
    records, _, decode, name = split_records(
        source,
        "validation",
        data_dir=data_dir,
        manual_dir=manual_dir,
        num_classes=num_classes,
        image_size=image_size,
        num_examples=num_examples,
        scene_seed=scene_seed,
        process_index=0,
        process_count=1,
        drop_remainder=False,
    )
    if limit is not None:
        records = records.take(limit)
    records = records.shard(process_count, process_index)

    def transform(record):
        example = decode(record)
        with tf.control_dependencies([_same_size(example)]):  # else scored on other pixels
            image, label = seg_transforms.eval_transform(example["image"], example["label"],
                                                         scale=scale)
        return {"image": image, "label": label}

    failed = {"image": tf.zeros([0, 0, 3], tf.uint8), "label": tf.zeros([0, 0], tf.int32)}
    for example in _each_or_failed(records, transform, failed, name).as_numpy_iterator():
        example["name"] = example["name"].decode()
        if not example.pop("valid"):
            raise BadDataError(_not_decoding([example["name"]], source))
        yield example


def _same_size(example):
    """An op failing (the example then counts as damaged) when the label map is not its
    image's size (QA: a label of another size was resized to and scored on the wrong pixels)."""
    return tf.debugging.assert_equal(tf.shape(example["image"])[:2],
                                     tf.shape(example["label"])[:2])


def check_validation_decodes(source, *, data_dir=None, manual_dir=None, limit=None) -> int:
    """Decodes every validation image and label of an "ade20k" source (the first `limit`),
    in parallel, before a run trains: a damaged one is an error now, naming each (evaluation
    needs them all), not at the first evaluation hours later. Every process checks all of
    them (ADE20K: 2000 pairs, a few seconds), so all stop together. Returns how many were
    checked (0 for generated scenes: nothing to decode)."""
    if source != "ade20k":
        return 0
    records, count, decode, name = split_records(
        source, "validation", data_dir=data_dir, manual_dir=manual_dir, num_classes=None,
        image_size=None, num_examples=None, scene_seed=0, process_index=0, process_count=1,
        drop_remainder=False)
    if limit is not None:
        records, count = records.take(limit), min(count, limit)

    def decoded(record):  # the shapes depend on both decodes: neither is pruned
        example = decode(record)
        return {"shapes": tf.concat([tf.shape(example["image"]), tf.shape(example["label"])], 0)}

    failed = {"shapes": tf.zeros([5], tf.int32)}
    bad, misfit = [], []
    for example in _each_or_failed(records, decoded, failed, name).as_numpy_iterator():
        (height, width), label = example["shapes"][:2], example["shapes"][3:5]
        if not example["valid"]:
            bad.append(example["name"].decode())
        elif (height, width) != tuple(label):
            misfit.append(f"{example['name'].decode()} (image {width}x{height}, label "
                          f"{label[1]}x{label[0]})")
    if bad:
        raise BadDataError(_not_decoding(sorted(bad), source, count))
    if misfit:
        raise BadDataError(
            f"{len(misfit)} validation label map(s) of {source} are not the size of their "
            f"image: {', '.join(sorted(misfit)[:10])}{' ...' if len(misfit) > 10 else ''}. "
            "Evaluation scores each pixel of the image against its label: put the release's "
            "own files back and prepare the data again (delete the prepared ade20k_semantic "
            "folder in data_dir; a preparation now refuses such pairs).")
    return count


def _each_or_failed(records, transform, failed, name):
    """transform(record) | {"name", "valid": True} per record, in order, decoded in parallel;
    `failed` | {"name", "valid": False} where it raises (a damaged file), not an error."""
    def attempt(record):
        return {**transform(record), "name": name(record), "valid": tf.constant(True)}

    @no_autograph
    def checked(record):
        done = tf.data.Dataset.from_tensors(record).map(no_autograph(attempt)).ignore_errors()
        fallback = tf.data.Dataset.from_tensors(
            {**failed, "name": name(record), "valid": tf.constant(False)})
        return done.concatenate(fallback).take(1).get_single_element()

    return records.map(checked, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True).prefetch(2)


def _not_decoding(names, source, count=None) -> str:
    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    which = (f"Validation image {listed} of {source} does not decode" if len(names) == 1 else
             f"Validation images {listed} of {source} do not decode")
    of = f" ({len(names)} of {count})" if count is not None else ""
    whose = "its" if len(names) == 1 else "each one's"
    return (f"{which}{of}: {whose} image or label file is damaged, the label holds a value "
            "past 150, or the label map is not the size of its image. Evaluation needs every "
            "image (leaving one out would change the metrics): replace the file in the release "
            "and prepare the data again (delete the prepared ade20k_semantic folder in "
            "data_dir).")
