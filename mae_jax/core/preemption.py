"""Stop signals: SIGTERM / Ctrl-C become a flag the training loop checks, so it saves and stops.

A stop on request is also a fact about the process: its exit status must tell a scheduler
"pre-empted, re-run to resume" apart from "completed". The loop records it with
`record_stop`; entry.py reads `stopped_on_request()` when the task returns.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_stopped_at_step: int | None = None


def record_stop(step: int | None) -> None:
    """The loop stopped on request after saving `step` (None: it ran to its end)."""
    global _stopped_at_step
    _stopped_at_step = step


def stopped_on_request() -> int | None:
    """The step at which the last training loop of this process stopped on a stop signal."""
    return _stopped_at_step


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the training loop checks, so it can save and exit.

    A second SIGINT raises KeyboardInterrupt as usual (an impatient Ctrl-C still stops the run).
    Handlers are installed only from the main thread and restored on exit. On several hosts,
    signals may arrive at different steps: check `requested_anywhere()` (one tiny all-gather) at
    log steps so that all processes stop at the same step.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.signal_received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("a second Ctrl-C: stopped at once, without waiting for the "
                                    "checkpoint being saved; the newest complete one is intact")
        self.requested = True
        self.signal_received = signum
        print(f"Received {signal.Signals(signum).name}: saving a checkpoint and stopping.")

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested_anywhere(self) -> bool:
        """True when any process got a stop signal (same answer on every process)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(int(self.requested))
        return bool(max(flags.reshape(-1)))


# Steps between two stop agreements of a multi-process loop (`StopAgreement`).
STOP_CHECK_EVERY_STEPS = 5


class StopAgreement:
    """Several processes agree on a stop signal every `every` steps without waiting for the
    devices.

    `requested_anywhere` reads its answer at once, so the host waits for every step already
    queued: done at log steps only, a signal could wait `log_every_steps` steps (50 by
    default, a minute for a large model) while a pre-emption's grace period is often 30 s.
    Here, at every `every`-th step each process hands its flag to a tiny collective (the
    maximum over all devices), queued behind that step like the next one, and reads the
    answer it handed in `every` steps before, long computed. Every process reads the same
    answers at the same steps, so all stop at the same step: within 2 * `every` steps of the
    signal. The host then runs at most `every` steps ahead of the devices, plenty to keep them
    busy.
    """

    def __init__(self, mesh, every: int = STOP_CHECK_EVERY_STEPS):
        self.every = every
        self.sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        self.shape = (mesh.devices.size,)
        self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._pending: jax.Array | None = None

    def check(self, step: int, requested: bool) -> bool:
        """At every `every`-th step: hands in `requested`, returns whether any process had
        asked at the previous such step (False at other steps)."""
        if step % self.every:
            return False
        stop = self._pending is not None and bool(np.asarray(
            self._pending.addressable_data(0)))
        flag = np.full((1,), int(requested), np.int32)
        shards = [jax.device_put(flag, device) for device in
                  self.sharding.addressable_devices_indices_map(self.shape)]
        self._pending = self._any(jax.make_array_from_single_device_arrays(
            self.shape, self.sharding, shards))
        return stop
