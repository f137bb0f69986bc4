"""Undecodable files never break a run, its pictures or its exact resume.

A file that fails to decode (a truncated JPEG, random bytes named .jpg, a file deleted since the
listing) is only found when the pipeline decodes it. Its example then takes the first decodable
of up to REPLACEMENTS other files of the shard, drawn with the example's own seed: a resumed
run sees the same batches, batches keep their shape and the dataset keeps the size of the file
listing (`ignore_errors` on the stream, as before, dropped examples and shifted everything after
them). Each such file is named in a warning once per iterator and counted. TFDS records
(validated when TFDS prepared them) have no random access: a failing training record's slot
takes another example of its decoding block (with that example's label; the block is a batch,
so a resume repeats it), and `fill` only when none of the block decodes or when evaluating
(`replacements=0`, the caller masks it out).

`decoded` does this in blocks of BLOCK examples: a block whose records all decode (the usual
case) costs one small dataset, not one per example; the replacement search runs only for the
examples that failed, so the output is the same either way.
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
# A training stream is `broken` once over MAX_FAILING of its examples (after at least
# MIN_EXAMPLES_JUDGED) had files that failed: broken data, not a damaged file or two.
MIN_EXAMPLES_JUDGED, MAX_FAILING = 32, 0.5
_REPLACEMENT_STREAM = 0x5EED  # folds the example seed into the replacement draws' seed


class Batches:
    """Iterator of numpy batches from a pipeline; names each undecodable file in the log once.

    `undecodable`: the names (paths, or TFDS record ids) seen failing so far. `num_batches`:
    the length of a finite (evaluation) pass, None for infinite streams.
    """

    def __init__(self, dataset: tf.data.Dataset, *, what: str, num_batches: int | None = None,
                 outcome: str = "its slot is filled by another image",
                 kind: str = "Undecodable image"):
        self._iterator = dataset.as_numpy_iterator()
        self.what = what
        self.outcome = outcome  # what became of an undecodable file's example
        self.kind = kind  # what the warning calls such a file
        self.num_batches = num_batches
        self.undecodable: set[str] = set()
        self._seen = self._failed = 0  # examples, and those whose own file failed
        self._said_none = False  # "None of N files tried ...": once (QA: 1,600 lines)
        # Set once most examples failed; the training loop stops every process on it at its
        # next log step (`loop.slowest_input`: one process stopping alone would leave the
        # others waiting in the step).
        self.broken: str | None = None

    def __iter__(self):
        return self

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an infinite training stream has no length")
        return self.num_batches

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._iterator.__next__()
        attempts, failed = batch.pop("attempts"), batch.pop("failed")
        self._seen += len(attempts)
        if attempts.any():  # the usual batch costs one vectorised test
            self._report(attempts, failed)
            self._failed += int(np.count_nonzero(attempts))
            self._check_failure_rate()
        return batch

    def _check_failure_rate(self):
        """`broken` when most examples so far failed: the data is broken as a whole (QA:
        ADE20K label maps all of another size trained a whole run on "all ignored", exit 0)."""
        if self.broken is None and self.num_batches is None and (
                self._seen >= MIN_EXAMPLES_JUDGED and self._failed > self._seen * MAX_FAILING):
            self.broken = (
                f"{self._failed} of the first {self._seen} examples of {self.what} could not be "
                f"used ({self.kind.lower()}), e.g. {', '.join(sorted(self.undecodable)[:3])}: "
                "the data is broken as a whole, not a file or two. Check how it was written.")

    def _report(self, attempts, failed):
        mean_slots = 0  # TFDS training: slots of a batch of which no example decoded
        for tries, names in zip(attempts, failed, strict=True):
            if not tries:
                continue
            mean = tries > len(names)  # `decoded` marks such a slot with one try too many
            mean_slots += mean
            for name in (n.decode() for n in names[:tries]):
                if name not in self.undecodable:
                    self.undecodable.add(name)
                    logger.warning("%s %s (%s): %s; %d such file(s) so far.", self.kind,
                                   name, self.what, "its slot is the mean colour" if mean
                                   else self.outcome, len(self.undecodable))
            if tries == len(names) and len(names) > 1 and not self._said_none:
                self._said_none = True
                logger.warning("None of %d files tried for one example of %s decodes: the "
                               "example is the mean colour (said once). Check the data.",
                               tries, self.what)
        if mean_slots:  # once a batch (review: once a slot, after "filled by another example")
            logger.warning("No example of a batch of %s decodes: its %d slot(s) are the mean "
                           "colour. Check the data.", self.what, mean_slots)


def _tries(shard: sources.Shard, replacements: int) -> int:
    return 1 + (replacements if shard.paths is not None else 0)  # TFDS: no random access


def _candidates(shard: sources.Shard, replacements: int, seed, record):
    """(names [tries], labels [tries], encoded(t)): the record, then `replacements` other
    records of the shard drawn with the example's seed (folders only)."""
    if shard.paths is None:
        names, labels = tf.reshape(record["name"], [1]), tf.reshape(record["label"], [1])
        return names, labels, lambda _: record["encoded"]
    ids = tf.reshape(record, [1])
    if replacements:
        draw_seed = tf.random.experimental.stateless_fold_in(seed, _REPLACEMENT_STREAM)
        drawn = tf.random.stateless_uniform([replacements], draw_seed, 0, shard.count,
                                            dtype=tf.int64)
        ids = tf.concat([ids, drawn], axis=0)
    names = tf.gather(shard.paths, ids)
    return names, tf.gather(shard.labels, ids), lambda t: tf.io.read_file(names[t])


def _fields(pixels) -> dict:
    """A transform's output as example fields: an image tensor is "image"; a dict (e.g. the
    canvas, box and flip of a resize left to the device) gives its own fields."""
    return dict(pixels) if isinstance(pixels, dict) else {"image": pixels}


def first_decodable(shard: sources.Shard, transform, *, replacements: int, fill):
    """(seed, record) -> a dataset of ONE example: the first of the record and `replacements`
    other records (drawn with the seed) whose bytes `transform(encoded, seed)` turns into an
    image (or a dict of fields, see `_fields`); else `fill` (valid False). Examples: {"image",
    "label", "attempts" (files that failed before), "failed" [1 + replacements] string (their
    names, "" elsewhere), "valid"}."""
    tries = _tries(shard, replacements)

    @no_autograph
    def first(seed, record):
        names, labels, encoded = _candidates(shard, tries - 1, seed, record)

        @no_autograph
        def attempt(t):
            return {**_fields(transform(encoded(t), seed)), "label": labels[t],
                    "attempts": tf.cast(t, tf.int32), "valid": tf.constant(True)}

        fallback = {**_fields(fill), "label": labels[0], "attempts": tf.constant(tries, tf.int32),
                    "valid": tf.constant(False)}
        # ignore_errors drops the attempts whose decoding raised; take(1) stops at a success.
        ds = tf.data.Dataset.range(tries).map(attempt).ignore_errors()
        ds = ds.concatenate(tf.data.Dataset.from_tensors(fallback)).take(1)
        return ds.map(lambda example: {
            **example, "failed": tf.where(tf.range(tries) < example["attempts"], names, ""),
        })

    return first


BLOCK = 32  # examples decoded by one instance of the map function (see `decoded`)


def decoded(stream: tf.data.Dataset, shard, transform, *, replacements, fill,
            block: int = BLOCK, pad=None, batches: bool = False):
    """Each (seed, record) of `stream` -> its first decodable example (`first_decodable`), in
    stream order.

    Blocks of `block` consecutive inputs are decoded in parallel (one block per thread). A
    block first decodes each record alone, errors dropped; only when some are missing does it
    run `first_decodable` for those (replacements, fill). The common path thus instantiates the
    transform once per block: once per example (a small dataset per example, as the slow path
    does) cost ~0.5 ms an image, 15% of the pipeline (`benchmarks/bench_input.py`).

    pad: {field: shape}: fields of varying size (the transform's crop windows) are zero-padded
    at their end to this shape as the block is assembled (one copy, no tf.pad first).

    batches=True: yield the blocks themselves, as batches of `block` (the last partial one
    dropped): a training stream batched by its block size skips an unbatch and a batch copy.
    """
    pad = dict(pad or {})
    # Traced once, called from both paths (tracing RandAugment twice took seconds).
    transform = tf.function(transform, input_signature=[
        tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)], autograph=False)
    slow = first_decodable(shard, transform, replacements=replacements, fill=fill)
    tries = _tries(shard, replacements)

    @no_autograph
    def alone(position, seed, record):
        names, labels, encoded = _candidates(shard, 0, seed, record)
        return position, {**_fields(transform(encoded(0), seed)), "label": labels[0],
                          "attempts": tf.constant(0, tf.int32), "valid": tf.constant(True),
                          "failed": tf.fill([tries], "")}

    @no_autograph
    def decode_block(positions, seeds, records):
        size = tf.shape(positions)[0]
        items = tf.data.Dataset.from_tensor_slices((positions, seeds, records))
        decoded_alone = items.map(alone).ignore_errors()
        # A sentinel at the end keeps the batch non-empty when every record fails.
        position_spec, fields = decoded_alone.element_spec
        sentinel = (tf.zeros([], position_spec.dtype),
                    {key: tf.zeros([d or 0 for d in spec.shape], spec.dtype)
                     for key, spec in fields.items()})
        shapes = ([], {key: pad.get(key, spec.shape) for key, spec in fields.items()})
        got_positions, got = decoded_alone.concatenate(
            tf.data.Dataset.from_tensors(sentinel)).padded_batch(
            block + 1, padded_shapes=shapes).get_single_element()
        found = tf.shape(got_positions)[0] - 1
        # slot[j]: where example j of the block is in `got`, -1 when it failed alone.
        slot = tf.tensor_scatter_nd_update(tf.fill([size], -1),
                                           (got_positions[:found] - positions[0])[:, None],
                                           tf.range(found))

        def repaired():
            def example(j):
                record = tf.nest.map_structure(lambda x: x[j], records)

                def replaced():
                    if not (shard.paths is None and replacements):
                        return _padded(slow(seeds[j], record).get_single_element(), pad)
                    # TFDS training: no random access, so another example of the block that
                    # decoded takes the slot, with its label; the mean colour only when none did.
                    # attempts 2 (> its one name) tells `Batches` the slot is the fill.
                    return tf.cond(found > 0, lambda: {
                        **tf.nest.map_structure(lambda x: x[j % tf.maximum(found, 1)], got),
                        "attempts": tf.constant(1, tf.int32),
                        "failed": tf.reshape(record["name"], [1])},
                        lambda: {**_padded(slow(seeds[j], record).get_single_element(), pad),
                                 "attempts": tf.constant(2, tf.int32)})

                return tf.cond(slot[j] >= 0,
                               lambda: tf.nest.map_structure(lambda x: x[slot[j]], got), replaced)

            return tf.data.Dataset.range(tf.cast(size, tf.int64)).map(
                lambda j: example(tf.cast(j, tf.int32))).batch(block).get_single_element()

        return tf.cond(found == size, lambda: tf.nest.map_structure(lambda x: x[:size], got),
                       repaired)

    blocks = stream.enumerate().batch(block, drop_remainder=batches)
    blocks = blocks.map(lambda positions, example: decode_block(positions, *example),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return blocks if batches else blocks.unbatch()


def _padded(example: dict, pad: dict) -> dict:
    """The fields named in `pad` zero-padded at their end to its shapes."""
    def padded(key, value):
        if key not in pad:
            return value
        missing = tf.constant(pad[key]) - tf.shape(value)
        return tf.ensure_shape(tf.pad(value, tf.stack([tf.zeros_like(missing), missing], 1)),
                               pad[key])

    return {key: padded(key, value) for key, value in example.items()}


def fill_image(image_size: int, colour) -> tf.Tensor:
    return tf.broadcast_to(tf.constant(colour, tf.uint8), [image_size, image_size, 3])
