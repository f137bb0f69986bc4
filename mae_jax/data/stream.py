"""The resumable, shuffled training stream every input pipeline uses (one seeding scheme).

A process's records are cut into epochs of `steps_per_epoch * batch_size` examples. Epoch `e` is
the records shuffled with a seed derived from (seed, process, e); example `i` of epoch `e`
carries the seed fold_in(epoch_seed, i) for its random augmentation (stateless ops). Batch `k`
therefore depends only on (seed, process, k): `start_step=k` skips `k // steps_per_epoch`
epochs arithmetically and `k % steps_per_epoch` batches of raw, undecoded records, and yields
exactly the batches a fresh stream yields from its k-th batch on.
"""

import tensorflow as tf


def check_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), defaulting to JAX's."""
    if process_index is None or process_count is None:
        import jax  # lazily: only the defaults need it

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    return process_index, process_count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"{process_count} processes; change the batch size."
        )
    return global_batch_size // process_count


def shuffled_stream(
    records: tf.data.Dataset,
    *,
    num_records: int,
    batch_size: int,
    seed: int,
    process_index: int,
    start_step: int = 0,
    shuffle_buffer_size: int = 50_000,
    what: str = "the dataset",
    indices: bool = False,
) -> tf.data.Dataset:
    """Infinite dataset of (example_seed [2] int64, record) in training order.

    records: this process's records in a fixed order (cheap to shuffle and skip: encoded bytes
    or indices). batch_size: this process's batch. `shuffle_buffer_size` bounds the per-epoch
    shuffle (a full shuffle when the shard is smaller). With `indices` the records are
    0 .. num_records - 1 (a folder's listing, sorted by class as ImageFolder's) and each epoch
    is a full permutation of them, whatever the buffer: a bounded shuffle of a sorted listing
    gives batches of a few neighbouring classes (with 1000 ImageNet classes and the default
    buffer, 40-150 classes a batch instead of ~640). The permutation is stateless
    (`tf.random.experimental.index_shuffle`): no buffer, and a resume skips arithmetically.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    steps_per_epoch = num_records // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{what} gives {num_records} example(s) per process, fewer than one local batch of "
            f"{batch_size}; lower the batch size (config.batch_size) or use more data."
        )
    start_epoch, skip_batches = divmod(start_step, steps_per_epoch)
    base_seed = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, 0], tf.int64), process_index
    )
    buffer = max(1, min(num_records, shuffle_buffer_size))

    last = tf.constant(num_records - 1, tf.int64)

    def epoch(index):
        epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        first = tf.where(index == start_epoch, tf.constant(skip_batches * batch_size, tf.int64), 0)
        if indices:
            permutation = tf.random.stateless_uniform(
                [2], epoch_seed, minval=None, maxval=None, dtype=tf.int64)
            return tf.data.Dataset.range(first, steps_per_epoch * batch_size).map(
                lambda position: (
                    tf.random.experimental.stateless_fold_in(epoch_seed, position),
                    tf.random.experimental.index_shuffle(position, permutation, last),
                )
            )
        shuffle_seed = tf.random.stateless_uniform(
            [], epoch_seed, minval=0, maxval=2**31 - 1, dtype=tf.int64
        )
        ds = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.take(steps_per_epoch * batch_size).enumerate()
        # Seeds per (epoch, position in epoch): independent of where the stream started.
        return ds.skip(first).map(
            lambda position, record: (
                tf.random.experimental.stateless_fold_in(epoch_seed, position),
                record,
            )
        )

    return tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch)
