"""Checkpoint files that go wrong: per-file checksums written into each checkpoint before orbax
commits it and checked before it is restored (a damaged checkpoint is moved aside, never
deleted), and failed writes (a full disk) reported once, with the fix.

Orbax commits a checkpoint by renaming `<step>.orbax-checkpoint-tmp` to `<step>` once every
process has written its files. Just before that rename (orbax's post-finalization callback, in
its background save thread, on the primary process only) `write_checksums` records the size and
CRC-32 of every file in `checksums.json`, so a committed checkpoint carries its checksums and a
half-written one never looks complete. `find_damage` re-reads the files: a truncated data file,
an emptied or garbled metadata file and flipped bytes (which orbax would restore silently) are
all found before orbax reads anything.

A failed write is raised by orbax in the main thread at the next save or wait: `WriteErrors`
turns it into one CheckpointWriteError. Meanwhile TensorStore's other pending writes finish
into orbax's already-closed event loop, each printing an "Event loop is closed" traceback
(hundreds for a full disk): `silence_closed_loop_callbacks` drops exactly those.

Cost: one CRC-32 pass over the checkpoint's bytes, 0.6-2 GB/s on one core of this (shared,
2-core) machine, so 0.7-2 s for a ViT-B MAE train state (112M parameters and two Adam moments,
1.34 GB) at each save, in orbax's background thread (zlib releases the GIL), and the same
again before a resume.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
import zlib
from typing import Any

from mae_jax.core.errors import cause_chain, is_memory_text, lost_peer

CHECKSUM_FILE = "checksums.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a checkpoint not yet committed
DAMAGED_INFIX = ".damaged-"
# Orbax's commit writes these after the checksums: they are checked for readability only.
COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
_CHUNK = 16 << 20


def file_checksum(path: str) -> tuple[int, int]:
    """(size in bytes, CRC-32) of one file, read in 16 MiB chunks."""
    size, crc = 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def _checked_files(step_dir: str) -> list[str]:
    """Paths (relative to step_dir, '/'-separated) of the files the checksums cover."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if relative != CHECKSUM_FILE and relative not in COMMIT_FILES:
                found.append(relative)
    return sorted(found)


def write_checksums(step_dir: str) -> str:
    """Writes `step_dir/checksums.json` ({path: [size, crc32]}) atomically; returns its path."""
    files = {
        relative: list(file_checksum(os.path.join(step_dir, relative)))
        for relative in _checked_files(step_dir)
    }
    path = os.path.join(step_dir, CHECKSUM_FILE)
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump({"format": 1, "algorithm": "crc32", "files": files}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def has_checksums(step_dir: str) -> bool:
    return os.path.exists(os.path.join(step_dir, CHECKSUM_FILE))


def find_damage(step_dir: str) -> str | None:
    """None when every file matches its checksum, else what is wrong, naming the file.

    A checkpoint without checksums (written by an older version) is not judged here: see
    `has_checksums`.
    """
    try:
        with open(os.path.join(step_dir, CHECKSUM_FILE)) as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{CHECKSUM_FILE} is unreadable ({error})"
    for relative, (size, crc) in sorted(files.items()):
        path = os.path.join(step_dir, relative)
        if not os.path.isfile(path):
            return f"{relative} is missing"
        actual_size = os.path.getsize(path)
        if actual_size != size:
            return f"{relative} has {actual_size} bytes, {size} were written (truncated?)"
        if file_checksum(path)[1] != crc:
            return f"{relative} has changed since it was written (checksum mismatch)"
    metadata = os.path.join(step_dir, COMMIT_FILES[0])
    if os.path.exists(metadata):
        try:
            with open(metadata) as handle:
                json.load(handle)
        except (OSError, ValueError) as error:
            return f"{COMMIT_FILES[0]} is unreadable ({error})"
    return None


def uncommitted_dir(directory: str, step: int) -> str | None:
    """The directory orbax is about to commit as `step`: its tmp directory, or the final one
    on storage that commits without a rename; None when neither exists."""
    prefix = f"{int(step)}{TMP_SUFFIX}"
    candidates = sorted(name for name in os.listdir(directory) if name.startswith(prefix))
    if candidates:
        return os.path.join(directory, candidates[-1])
    final = os.path.join(directory, str(int(step)))
    return final if os.path.isdir(final) else None


def move_aside(step_dir: str) -> str:
    """Renames `<step>` to `<step>.damaged-<time>` (orbax ignores that name); returns it."""
    target = f"{step_dir.rstrip(os.sep)}{DAMAGED_INFIX}{time.strftime('%Y%m%dT%H%M%S')}"
    suffix = 0
    while os.path.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
    target += f"-{suffix}" if suffix else ""
    os.rename(step_dir, target)
    return target


# --------------------------------------------------------------------------- failed writes
class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); older ones are intact."""


def is_out_of_space(error: BaseException | None) -> bool:
    """True for ENOSPC / EDQUOT anywhere in the cause chain, or TensorStore's RESOURCE_EXHAUSTED
    (how orbax reports a full disk: a ValueError), but not XLA's RESOURCE_EXHAUSTED for memory
    (`errors.is_memory_text`): a step that does not fit a GPU is no full disk."""
    for link in cause_chain(error):
        if getattr(link, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(link)
        if "No space left on device" in text or (
                "RESOURCE_EXHAUSTED" in text and not is_memory_text(text)):
            return True
    return False


# TensorStore's I/O failures reach orbax's callers as ValueErrors; these name them.
_STORAGE_TEXT = re.compile(r"\b(PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS)\b"
                           r"|OS error|Error (writing|opening|reading|deleting|renaming)")


def is_storage_error(error: BaseException | None) -> bool:
    """Whether `error` (or its cause chain) is the storage failing: an OSError (a full disk,
    permissions, a file server gone), TensorStore's I/O errors, a full disk; not another
    process gone (JAX's UNAVAILABLE heartbeats, DEADLINE_EXCEEDED barrier: `lost_peer`)."""
    if lost_peer(error) and not is_out_of_space(error):
        return False
    return is_out_of_space(error) or any(
        isinstance(link, OSError) or _STORAGE_TEXT.search(str(link))
        for link in cause_chain(error))


class WriteErrors:
    """Context manager: the storage failing during orbax's save / wait becomes one
    CheckpointWriteError naming the checkpoint, the newest committed one and the fix (free
    space for a full disk). Any other error (a bug, an error of the step surfacing where the
    save reads the state) goes on as it is, noted with the checkpoint, so its traceback and
    exit status are its own: "re-run to resume" would only repeat it.

    checkpointer: has `saving_step`, `directory` and `latest_step()`.
    """

    def __init__(self, checkpointer: Any):
        self.checkpointer = checkpointer

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if not isinstance(error, Exception) or isinstance(error, CheckpointWriteError):
            return False
        checkpointer = self.checkpointer
        if not is_storage_error(error):
            error.add_note(f"(while saving checkpoint {checkpointer.saving_step} in "
                           f"{checkpointer.directory})")
            return False
        try:
            kept = checkpointer.latest_step()
        except Exception:  # noqa: BLE001 - only for the message
            kept = None
        full = is_out_of_space(error)
        fix = ("The disk is full: free space (or point --workdir at a larger disk)" if full
               else "Fix the cause")
        older = f"checkpoint {kept} is intact" if kept is not None else "none was committed"
        raise CheckpointWriteError(
            errno.ENOSPC if full else errno.EIO,
            f"Could not write checkpoint {checkpointer.saving_step} in "
            f"{checkpointer.directory}: {str(error).splitlines()[0][:500]}. {fix}, then re-run "
            f"the same command to resume ({older}).",
        ) from error


def silence_closed_loop_callbacks() -> None:
    """Installs (once) an unraisable-exception hook that drops "Event loop is closed" raised
    by asyncio's call_soon_threadsafe: TensorStore completing a write or read that orbax
    stopped awaiting after another one failed. Every other exception reaches the old hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_callbacks", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop_callbacks = True
    sys.unraisablehook = hook
