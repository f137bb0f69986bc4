"""Which exit status an error ends a run with (the statuses: `mae_jax.core.errors`).

Apart from the entry point, whose import defines command-line flags: `mae_jax.core.processes`
asks it of a library's errors too, to pass a failed process's status to the others.
"""

from __future__ import annotations

import sys

from mae_jax.core import checkpoint_integrity as integrity
from mae_jax.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_WRITE_FAILED,
    BadInputError,
    ProcessFailedError,
    lost_peer,
)


def diverged(error: BaseException) -> bool:
    """A NonFiniteLossError, without importing the loop (and JAX) to ask: where the loop
    never loaded (a config refused before the library), the error cannot be one."""
    loop = sys.modules.get("mae_jax.core.loop")
    return loop is not None and isinstance(error, loop.NonFiniteLossError)


def exit_status(error: BaseException) -> int:
    """The exit status `error` ends a run with."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, ProcessFailedError):  # the status of the process that failed
        return error.status
    if diverged(error):
        return EXIT_DIVERGED
    if isinstance(error, integrity.CheckpointWriteError) or integrity.is_out_of_space(
            error):
        return EXIT_WRITE_FAILED
    if lost_peer(error):  # not this process's input: re-launching them all resumes
        return EXIT_FAILED
    bad_input = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                 PermissionError, BadInputError)
    return EXIT_BAD_INPUT if isinstance(error, bad_input) else EXIT_FAILED
