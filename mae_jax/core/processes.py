"""Work that process 0 does alone, whose answer every process needs.

With several processes the others wait for process 0's answer in a broadcast. If process 0
raised instead, they waited there until JAX's heartbeat timeout killed them, with no word of
why. `from_process_0` broadcasts the failure too: process 0 raises its own error and every
other process a short one pointing at process 0's log, at once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np


class ProcessZeroError(RuntimeError):
    """Process 0 failed at something every process waits for."""


def from_process_0(compute: Callable[[], int], what: str) -> int:
    """compute() on process 0 (an int32 answer), broadcast to every process.

    what: the work, for the other processes' error ("locking /runs/x")."""
    answer, error = 0, None
    if jax.process_index() == 0:
        try:
            answer = int(compute())
        except Exception as caught:  # noqa: BLE001 - every process must hear of it
            error = caught
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        shared = multihost_utils.broadcast_one_to_all(
            np.array([answer, error is not None], np.int32))
        answer, failed = (int(value) for value in shared)
        if failed and error is None:
            raise ProcessZeroError(f"Process 0 failed {what}; its log says why. This process "
                                   "stops too instead of waiting for it.")
    if error is not None:
        raise error
    return answer


def same_on_every_process(value: int, what: str) -> None:
    """Raises BadDataError on every process when `value` differs between processes (e.g. the
    training images each process counted in its own copy of the dataset: an incomplete copy
    on one host gave it another schedule and another share of the data, and the processes
    with the shorter run then left the others waiting in a collective at its end)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    from mae_jax.core.errors import BadDataError

    values = [int(v) for v in np.asarray(multihost_utils.process_allgather(
        np.int32(value))).reshape(-1)]
    if len(set(values)) > 1:
        listed = ", ".join(f"process {index}: {seen}" for index, seen in enumerate(values))
        raise BadDataError(f"The processes disagree on {what} ({listed}): each host must see "
                           "the same dataset (a shared data_dir, or identical complete copies).")


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """The element-wise int64 sum of every process's `counts` (exact beyond 2**31: JAX without
    x64 would carry int64 as int32, so each count travels as two 31-bit words)."""
    counts = np.asarray(counts, np.int64)
    if jax.process_count() == 1:
        return counts
    from jax.experimental import multihost_utils

    words = np.stack(np.divmod(counts, 2**31)).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(words), np.int64)
    gathered = gathered.reshape(-1, *words.shape)
    return (gathered[:, 0] * 2**31 + gathered[:, 1]).sum(axis=0)
