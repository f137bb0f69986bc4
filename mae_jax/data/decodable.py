"""Undecodable files never break a run, its pictures or its exact resume.

A file that fails to decode (a truncated JPEG, random bytes named .jpg, a file deleted since the
listing) is only found when the pipeline decodes it. Its example then takes the first decodable
of up to REPLACEMENTS other files of the shard, drawn with the example's own seed: a resumed
run sees the same batches, batches keep their shape and the dataset keeps the size of the file
listing (`ignore_errors` on the stream, as before, dropped examples and shifted everything after
them). Each such file is named in a warning once per iterator and counted. TFDS records
(validated when TFDS prepared them) have no random access: a failure there gets `fill`.
"""

import logging

import numpy as np
import tensorflow as tf

from mae_jax.data import sources

logger = logging.getLogger(__name__)

# Our map functions use graph ops only (tf.cond, no Python control flow on tensors): skipping
# autograph's source transformation saves seconds of start-up.
no_autograph = tf.autograph.experimental.do_not_convert
REPLACEMENTS = 9  # other files tried for an undecodable one before the fill image
_REPLACEMENT_STREAM = 0x5EED  # folds the example seed into the replacement draws' seed


class Batches:
    """Iterator of numpy batches from a pipeline; names each undecodable file in the log once.

    `undecodable`: the names (paths, or TFDS record ids) seen failing so far. `num_batches`:
    the length of a finite (evaluation) pass, None for infinite streams.
    """

    def __init__(self, dataset: tf.data.Dataset, *, what: str, num_batches: int | None = None):
        self._iterator = dataset.as_numpy_iterator()
        self.what = what
        self.num_batches = num_batches
        self.undecodable: set[str] = set()

    def __iter__(self):
        return self

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an infinite training stream has no length")
        return self.num_batches

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._iterator.__next__()
        attempts, failed = batch.pop("attempts"), batch.pop("failed")
        if attempts.any():  # the usual batch costs one vectorised test
            self._report(attempts, failed)
        return batch

    def _report(self, attempts, failed):
        for tries, names in zip(attempts, failed, strict=True):
            if not tries:
                continue
            for name in (n.decode() for n in names[:tries]):
                if name not in self.undecodable:
                    self.undecodable.add(name)
                    logger.warning("Undecodable image %s (%s): its slot is filled by another "
                                   "image; %d undecodable file(s) so far.", name, self.what,
                                   len(self.undecodable))
            if tries == len(names) and len(names) > 1:
                logger.warning("None of %d files tried for one example of %s decodes: the "
                               "example is the mean colour. Check the data.", tries, self.what)


def first_decodable(shard: sources.Shard, transform, *, replacements: int, fill):
    """(seed, record) -> a dataset of ONE example: the first of the record and `replacements`
    other records (drawn with the seed) whose bytes `transform(encoded, seed)` turns into an
    image; else `fill` (valid False). Examples: {"image", "label", "attempts" (files that failed
    before), "failed" [1 + replacements] string (their names, "" elsewhere), "valid"}."""
    if shard.paths is None:
        replacements = 0  # TFDS records: no random access to others

    @no_autograph
    def first(seed, record):
        if shard.paths is not None:
            draw_seed = tf.random.experimental.stateless_fold_in(seed, _REPLACEMENT_STREAM)
            drawn = tf.random.stateless_uniform([replacements], draw_seed, 0, shard.count,
                                                dtype=tf.int64)
            ids = tf.concat([tf.reshape(record, [1]), drawn], axis=0)
            names, labels = tf.gather(shard.paths, ids), tf.gather(shard.labels, ids)

            def encoded(t):
                return tf.io.read_file(names[t])
        else:
            names, labels = tf.reshape(record["name"], [1]), tf.reshape(record["label"], [1])

            def encoded(_):
                return record["encoded"]

        tries = 1 + replacements

        @no_autograph
        def attempt(t):
            return {"image": transform(encoded(t), seed), "label": labels[t],
                    "attempts": tf.cast(t, tf.int32), "valid": tf.constant(True)}

        fallback = {"image": fill, "label": labels[0], "attempts": tf.constant(tries, tf.int32),
                    "valid": tf.constant(False)}
        # ignore_errors drops the attempts whose decoding raised; take(1) stops at a success.
        ds = tf.data.Dataset.range(tries).map(attempt).ignore_errors()
        ds = ds.concatenate(tf.data.Dataset.from_tensors(fallback)).take(1)
        return ds.map(lambda example: {
            **example, "failed": tf.where(tf.range(tries) < example["attempts"], names, ""),
        })

    return first


def decoded(stream: tf.data.Dataset, shard, transform, *, replacements, fill):
    # One single-example dataset per input, in input order (deterministic interleave).
    return stream.interleave(
        first_decodable(shard, transform, replacements=replacements, fill=fill),
        cycle_length=tf.data.AUTOTUNE, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def fill_image(image_size: int, colour) -> tf.Tensor:
    return tf.broadcast_to(tf.constant(colour, tf.uint8), [image_size, image_size, 3])
