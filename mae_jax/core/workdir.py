"""The run directory: made writable once, and owned by one run at a time.

`lock_workdir` holds an exclusive `flock` on `workdir/run.lock` for the life of the run and
writes the holder's host and pid into it. A second run on the same workdir fails at once,
naming the holder. The kernel drops the lock when its process dies, so a lock file that still
names a process but is not locked was left by a run that died: on the same host it is taken
over with a message; from another host (a shared filesystem, where locks may not reach across
machines) the user is asked to check and delete it, unless it names this very scheduler job
(a SLURM / PBS / LSF job requeued onto other nodes after its processes were killed: a
scheduler runs one incarnation of a job at a time). With several processes, process 0 holds
the lock and all processes get its answer.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from mae_jax.core.errors import BadInputError

LOCK_FILE = "run.lock"
# The scheduler's job id, recorded in the lock (SLURM's with its step: two steps of one
# allocation running at once are two runs).
_JOB_VARIABLES = (("SLURM_JOB_ID", "SLURM_STEP_ID"), ("PBS_JOBID",), ("LSB_JOBID",))


def scheduler_job(environ=os.environ) -> str | None:
    """"SLURM_JOB_ID=123.0", "PBS_JOBID=..." or "LSB_JOBID=...": this job's id, None outside a
    scheduler."""
    for names in _JOB_VARIABLES:
        if environ.get(names[0]):
            return f"{names[0]}=" + ".".join(environ.get(name, "") for name in names)
    return None


class WorkdirLockedError(BadInputError, RuntimeError):
    """Another run holds the workdir."""


class WorkdirPathError(BadInputError, OSError):
    """A --workdir that is a file, or that this process cannot write to."""


def set_aside(path: str) -> str:
    """Renames `path` to `<name>.replaced-<time><ext>` beside it (kept, never deleted) and
    returns the new path."""
    root, ext = os.path.splitext(path)
    stamp = f"{root}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
    kept, count = f"{stamp}{ext}", 1
    while os.path.exists(kept):  # another set aside within the second (review)
        count += 1
        kept = f"{stamp}-{count}{ext}"
    os.replace(path, kept)
    return kept


def ensure_workdir(workdir: str) -> str:
    """The absolute workdir, created if needed; a clear error when it is not writable."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirPathError(f"--workdir {workdir} is a file, not a directory: give a new "
                               "or existing run directory.")
    # A name per process: several processes of one run probe the same shared directory.
    probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise WorkdirPathError(f"Cannot write to workdir {workdir}: {error}") from error
    return workdir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started', '?')}")


class WorkdirLock:
    """An exclusive lock on `workdir/run.lock`; `release()` (or process exit) frees it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._handle = None

    def acquire(self) -> WorkdirLock:
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            holder = self._read(handle)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise WorkdirLockedError(
                    f"{os.path.dirname(self.path)} is in use by another run "
                    f"({_describe(holder) if holder else 'holder unknown'}). Wait for it to "
                    "finish or stop it, or give this run another --workdir."
                ) from None
            except OSError:  # a filesystem without flock: judge by the pid alone
                locked = False
            if holder:
                self._take_over(holder, verified_dead=locked)
            handle.seek(0)
            handle.truncate()
            json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "job": scheduler_job()},
                      handle)
            handle.flush()
            os.fsync(handle.fileno())  # other hosts read it (`check_shared`)
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        return self

    def _take_over(self, holder: dict, *, verified_dead: bool) -> None:
        same_host = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        alive = isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)
        job = scheduler_job()
        if not same_host and job is not None and holder.get("job") == job:
            print(f"Taking over {self.path}: its holder ({_describe(holder)}) is an earlier "
                  f"incarnation of this scheduler job ({job}), requeued.", flush=True)
            return
        if not same_host:
            raise WorkdirLockedError(
                f"{self.path} names a run on another host ({_describe(holder)}) that this "
                "host cannot check. If that run is no longer running, delete the file and "
                "re-run; otherwise give this run another --workdir."
            )
        if alive and not verified_dead:
            raise WorkdirLockedError(
                f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}). "
                "Wait for it to finish or stop it, or give this run another --workdir."
            )
        print(f"Taking over {self.path}: its holder ({_describe(holder)}) is no longer "
              "running.", flush=True)

    @staticmethod
    def _read(handle) -> dict:
        handle.seek(0)
        text = handle.read().strip()
        if not text:
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return {"pid": None, "host": socket.gethostname(), "started": "? (unreadable)"}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        """Empties the lock file (an empty file is a free workdir) and unlocks it."""
        if self._handle is None:
            return
        try:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
        except OSError:
            pass  # the kernel still drops the lock below
        finally:
            self._handle.close()
            self._handle = None


def lock_workdir(workdir: str) -> WorkdirLock | None:
    """Process 0 locks `workdir`; every process raises WorkdirLockedError if it could not.

    Returns the lock on process 0, None on the others.
    """
    from mae_jax.core.processes import from_process_0

    held: list[WorkdirLock | WorkdirLockedError] = []  # process 0's lock, or why not

    def acquire() -> int:
        try:
            held.append(WorkdirLock(workdir).acquire())
        except WorkdirLockedError as caught:
            held.append(caught)
            return 1
        return 0

    # Process 0's other errors (the lock file unreadable, ...) reach every process too.
    if from_process_0(acquire, f"locking {workdir}"):
        raise held[0] if held else WorkdirLockedError(
            f"Process 0 could not lock {workdir}: another run holds it (see its log).")
    return held[0] if held else None


def check_shared(workdir: str, *, wait_s: float = 10.0) -> None:
    """With several processes: every process sees process 0's lock file in `workdir`, i.e. the
    workdir is one shared directory (QA: a --workdir of its own on each host, or one path not
    shared between them, trained and then hung at the first checkpoint, without a word). A
    host whose view lags (a network file system's cache) gets `wait_s` to catch up."""
    import jax

    if jax.process_count() == 1:
        return
    import zlib

    import numpy as np
    from jax.experimental import multihost_utils

    from mae_jax.core.processes import from_process_0

    path = os.path.join(workdir, LOCK_FILE)

    def seen() -> int:
        try:
            with open(path, "rb") as handle:
                return zlib.crc32(handle.read()) & 0x7FFFFFFF
        except OSError:
            return -1

    expected = from_process_0(seen, f"reading {path}")
    deadline = time.monotonic() + wait_s
    while seen() != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    sees = int(seen() == expected)
    views = [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(sees)))
             .reshape(-1)]
    blind = [index for index, view in enumerate(views) if not view]
    if blind:
        raise WorkdirPathError(
            f"Process(es) {blind} do not see process 0's {LOCK_FILE} in --workdir {workdir}: "
            "the workdir must be one directory shared by every host (the same path on a shared "
            "file system), given the same way to every process.")
