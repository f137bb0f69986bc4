"""Work whose failure on one process every process must hear of.

A process that raised while the others went on to their next collective left them waiting in
it: on GPUs until JAX's heartbeat timeout killed them, with no word of why; on CPUs gloo failed
at once with "connection closed by peer", an unexpected error (exit status 1) that names
nothing. Two tools share the failure instead, with the failed process's exit status:

- `from_process_0`: work process 0 does alone (the workdir lock, the checkpoint check), whose
  answer every process needs (one broadcast).
- `failing_together`: a block every process enters at the same point, holding no collective,
  whose writes only process 0 does (metrics.jsonl, the evaluation's results, the model spec,
  the config record). One all-gather of each process's status at its end.

Every other process then raises `ProcessFailedError`: one line pointing at the failed
process's log, exiting with that process's status (74 for a full disk, 2 for bad input, 130
for a stop signal to that host alone outside the training loop, ...), at once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from mae_jax.core.errors import EXIT_INTERRUPTED, ProcessFailedError
from mae_jax.core.statuses import exit_status


def failure_status(error: BaseException) -> int:
    """The exit status `error` ends a run with (never 0)."""
    return exit_status(error) or 1


def raise_for(statuses: list[int], what: str) -> None:
    """ProcessFailedError for the first process whose exit status is not 0, if any."""
    failed = [index for index, status in enumerate(statuses) if status]
    if failed:
        index = failed[0]
        failed = "was stopped while" if statuses[index] == EXIT_INTERRUPTED else "failed"
        raise ProcessFailedError(
            f"Process {index} {failed} {what} (exit status {statuses[index]}); its log says why. "
            "This process stops too instead of waiting for it.", statuses[index])


def from_process_0(compute: Callable[[], int], what: str) -> int:
    """compute() on process 0 (an int32 answer), broadcast to every process.

    what: the work, for the other processes' error ("locking /runs/x")."""
    answer, error = 0, None
    if jax.process_index() == 0:
        try:
            answer = int(compute())
        except (Exception, KeyboardInterrupt) as caught:  # noqa: BLE001 - every process must hear
            error = caught
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        status = 0 if error is None else failure_status(error)
        shared = multihost_utils.broadcast_one_to_all(np.array([answer, status], np.int32))
        answer, status = (int(value) for value in shared)
        if error is None:
            raise_for([status], what)
    if error is not None:
        raise error
    return answer


class failing_together:  # noqa: N801 - used as a statement: `with failing_together(...):`
    """A block every process enters at the same point and that holds no collective (nor
    another such block): an exception in it on any process is raised on every process, its
    own error where it happened, `ProcessFailedError` elsewhere.

    what: the block's work, for the other processes' error ("writing metrics.jsonl")."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        # A stop signal outside the training loop is a KeyboardInterrupt (`entry`): a host's
        # own pre-emption must reach the others too (status 130). SystemExit and the like go.
        if jax.process_count() == 1 or (
                error is not None and not isinstance(error, (Exception, KeyboardInterrupt))):
            return False
        from jax.experimental import multihost_utils

        status = 0 if error is None else failure_status(error)
        statuses = [int(value) for value in np.asarray(
            multihost_utils.process_allgather(np.int32(status))).reshape(-1)]
        if error is None:
            raise_for(statuses, self.what)
        return False


def same_on_every_process(value: int, what: str, *, fix: str = "each host must see the same "
                          "dataset (a shared data_dir, or identical complete copies).") -> None:
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
        raise BadDataError(f"The processes disagree on {what} ({listed}): {fix}")


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
