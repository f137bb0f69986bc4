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
