"""Transparent huge pages for glibc's large allocations, in runs that compute on the CPU.

XLA:CPU takes every step's temporary buffer from malloc (3.2 GB for the ViT-Tiny MAE step at
224 px, batch 32). glibc serves an allocation that large with a fresh mmap and returns it at the
end of the step, so the kernel faults the buffer in again, zeroed, 4 KiB at a time, on every step
(~820k page faults a step). glibc >= 2.35's tunable `glibc.malloc.hugetlb=1` has malloc advise
transparent huge pages (MADV_HUGEPAGE) on such mappings: 2 MiB faults, 2-28k a step. Measured
on 2 Intel Xeon vCPUs (benchmarks/README.md): the ViT-Tiny MAE step 5.99 -> 5.15 s, the UPerNet
ViT-B step at 128 px 2.79-2.86 -> 2.57-2.58 s; PyTorch's steps gain less (its buffers come from
the same malloc: 5.37 -> 4.96 s for ViT-Tiny).

Tunables are read when a process starts, so the entry points (`mae_jax.core.entry.run`, the
benchmark scripts) call `reexec_with_hugepages` first: it restarts the same command once with
the tunable added to GLIBC_TUNABLES (same PID, arguments and other variables) when

- the C library is glibc >= 2.35 on Linux and transparent huge pages are `always` or `madvise`
  (/sys/kernel/mm/transparent_hugepage/enabled),
- GLIBC_TUNABLES does not set glibc.malloc.hugetlb already (so it restarts at most once), and
- the run computes on the CPU: JAX_PLATFORMS names only cpu, or no accelerator device node
  (NVIDIA, AMD, TPU) exists. With an accelerator XLA's buffers live on the device.

MAE_JAX_MALLOC_HUGEPAGES=0 turns it off; =1 turns it on with an accelerator present too.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Mapping

TUNABLE = "glibc.malloc.hugetlb"
SWITCH = "MAE_JAX_MALLOC_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*",
                     "/dev/vfio/[0-9]*")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None for another C library or OS."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The bracketed (active) word of the kernel's THP setting: always / madvise / never."""
    try:
        with open(path) as handle:
            words = handle.read().split()
    except OSError:
        return None
    return next((word[1:-1] for word in words if word.startswith("[")), None)


def has_accelerator(environ: Mapping[str, str],
                    exists: Callable[[str], bool] = lambda pattern: bool(glob.glob(pattern))
                    ) -> bool:
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    return any(exists(pattern) for pattern in ACCELERATOR_NODES)


def hugepage_environ(environ: Mapping[str, str] = os.environ, *, glibc=None, thp=None,
                     accelerator=None) -> dict[str, str] | None:
    """`environ` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, or None where it does
    not apply (see the module docstring). `glibc`, `thp`, `accelerator` override the probes."""
    switch = environ.get(SWITCH, "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"{SWITCH}={switch!r}: use 0 (off) or 1 (on with an accelerator too).")
    tunables = environ.get("GLIBC_TUNABLES", "")
    if switch == "0" or _setting(tunables) is not None:
        return None
    glibc = glibc_version() if glibc is None else glibc
    thp = thp_mode() if thp is None else thp
    if sys.platform != "linux" or glibc is None or glibc < (2, 35) or thp not in ("always",
                                                                                    "madvise"):
        return None
    accelerator = has_accelerator(environ) if accelerator is None else accelerator
    if accelerator and switch != "1":
        return None
    setting = f"{TUNABLE}=1"
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}


def _setting(tunables: str) -> str | None:
    """The value GLIBC_TUNABLES ('name=value:name=value') gives glibc.malloc.hugetlb, if any."""
    return dict(item.partition("=")[::2] for item in tunables.split(":") if item).get(TUNABLE)


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a process started with `environ` runs with malloc's huge pages, by the time an
    entry point has called `reexec_with_hugepages` (for benchmark headers)."""
    value = _setting(environ.get("GLIBC_TUNABLES", ""))
    if value is not None:
        return value not in ("", "0")
    return hugepage_environ(environ) is not None


def reexec_with_hugepages(environ: Mapping[str, str] = os.environ) -> None:
    """Restarts this process's command with `hugepage_environ(environ)` where that applies;
    returns (doing nothing) otherwise. Call it first thing, before any work."""
    env = hugepage_environ(environ)
    if env is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    print(f"mae_jax: restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages for "
          f"XLA:CPU's step buffers; {SWITCH}=0 turns this off)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
