"""Bad input whose message is the whole story: what is wrong and how to fix it; and the exit
statuses (`mae_jax.core.statuses` says which error ends a run with which).

The entry points (`mae_jax.core.entry`) print such an error without a traceback and exit with
status 2 (bad input). Each class also derives from the builtin a caller would catch
(FileNotFoundError, ValueError, RuntimeError), so `except FileNotFoundError` still works.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# Exit statuses; mae_jax.core.entry's docstring says what each means, `statuses` which error
# ends a run with which.
EXIT_COMPLETED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_WRITE_FAILED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 74, 75, 130


class BadInputError(Exception):
    """Base: the message names the problem and the fix."""


class DataNotFoundError(BadInputError, FileNotFoundError):
    """A dataset, folder or archive that is not where the config says."""


class BadDataError(BadInputError, ValueError):
    """Data that is there but cannot be used as given (no images, a damaged archive, ...)."""


class DataUnavailableError(BadInputError, RuntimeError):
    """A dataset that could not be downloaded or prepared (e.g. no network)."""


class CheckpointMismatchError(BadInputError, ValueError):
    """A checkpoint that does not fit the config (another model size or optimizer)."""


class WeightsError(BadInputError, ValueError):
    """A weights file or run that cannot be read, or does not fit the model it is loaded into."""


class DeviceMemoryError(BadInputError, RuntimeError):
    """The step or the state does not fit the devices' memory with this config."""


class ProcessFailedError(RuntimeError):
    """Another process failed at something every process does at the same point
    (`mae_jax.core.processes`); the message points at its log.

    status: that process's exit status, which this one exits with too."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# How XLA words an allocation that failed (device or host memory, not disk): "Out of memory
# while trying to allocate N bytes." (buffer assignment), "Failed to allocate request for
# 2.99GiB (3206250496B) on device ordinal 0" (the GPU's BFC allocator), "Attempting to reserve
# 6.48G at the bottom of memory. That was not possible." (TPU).
_MEMORY_PHRASES = ("out of memory", "failed to allocate request", "attempting to reserve")


def is_memory_text(text: str) -> bool:
    """Whether an error message is XLA's failed memory allocation (RESOURCE_EXHAUSTED with one
    of its out-of-memory phrases). A full disk is also RESOURCE_EXHAUSTED (TensorStore's), but
    names no memory allocation."""
    return "RESOURCE_EXHAUSTED" in text and any(p in text.lower() for p in _MEMORY_PHRASES)


def cause_chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then what it was raised from or while handling, and so on (cycles end it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


# What a collective says when another process of the run is gone (killed, stopped or failed
# outside the blocks that share failures): gloo on CPUs, JAX's coordination service.
_LOST_PEER = re.compile(r"Connection (reset|closed) by peer|Gloo \w+ failed|stopped sending "
                        r"heartbeats|Socket closed|Barrier timed out")


def lost_peer(error: BaseException | None) -> str | None:
    """The line saying another process is gone, when `error` (or its cause chain) has one."""
    for link in cause_chain(error):
        for line in str(link).splitlines():
            if _LOST_PEER.search(line):
                return line.strip()[:300]
    return None


def device_out_of_memory(error: BaseException | None) -> str | None:
    """XLA's line, from "RESOURCE_EXHAUSTED" on, when `error` or an error in its cause chain is
    a failed memory allocation (the deepest such link: not the checkpoint-write error that may
    wrap it), else None."""
    found = None
    for link in cause_chain(error):
        text = str(link)
        if is_memory_text(text):
            line = next(line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line)
            found = line[line.index("RESOURCE_EXHAUSTED"):].strip().rstrip(".")
    return found


def device_memory_error(error: BaseException, config) -> DeviceMemoryError | None:
    """A DeviceMemoryError naming the ways to fit a run that ran out of device memory, None
    for other errors. config: the run's (its batch fields are named where it has them)."""
    line = device_out_of_memory(error) if isinstance(error, Exception) else None
    if line is None:  # (a Ctrl-C while unwinding from one stays an interruption)
        return None
    batch = ["batch_size"]
    if "grad_accum_steps" in config:
        batch.append("grad_accum_steps=K: the same batch in K micro-batches")
    if "eval_batch_size" in config:
        batch.append("eval_batch_size, for an evaluation")
    fields = [name.split("=")[0] for name in batch if not name.startswith("eval_")]
    fields.append("model.dtype")  # eval_batch_size is a harmless change (run_record)
    model = config.get("model") or {}
    dtype = "" if model.get("dtype") == "bfloat16" else "model.dtype=bfloat16; "
    return DeviceMemoryError(
        f"The devices ran out of memory ({line}). To fit the run: a smaller batch per device "
        f"({', or '.join(batch)}); {dtype}mesh.fsdp=K (parameters and optimizer state split over K "
        "devices); more devices; on GPUs, XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (JAX takes 75% "
        "of the memory by default). Checkpoints already written are intact: re-run with the "
        f"change to resume (--config_change_ok for {', '.join(fields[:-1])} or {fields[-1]}; "
        "the change is recorded).")
