"""mae_jax.core.hostmem: when a run restarts itself with glibc's huge-page tunable, and that the
tunable does what it is for (a large malloc backed by transparent huge pages)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mae_jax.core import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = {"glibc": (2, 36), "thp": "madvise", "accelerator": False}


def test_the_tunable_is_added_to_what_glibc_tunables_already_holds():
    assert hostmem.hugepage_environ({}, **HERE)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = hostmem.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"},
                                   **HERE)
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}


@pytest.mark.parametrize("environ,probes", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user's own setting wins
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {}),  # already restarted: never twice
    ({hostmem.SWITCH: "0"}, {}),
    ({}, {"glibc": (2, 34)}),  # the tunable came with glibc 2.35
    ({}, {"thp": "never"}),
    ({}, {"accelerator": True}),  # XLA's buffers live on the device
])
def test_where_it_does_not_apply(environ, probes):
    assert hostmem.hugepage_environ(environ, **(HERE | probes)) is None


def test_the_switch_forces_it_with_an_accelerator_and_rejects_other_values():
    on = hostmem.hugepage_environ({hostmem.SWITCH: "1"}, **(HERE | {"accelerator": True}))
    assert on["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    with pytest.raises(ValueError, match="use 0 .off. or 1"):
        hostmem.hugepage_environ({hostmem.SWITCH: "yes"}, **HERE)


def test_jax_platforms_decides_before_the_device_nodes():
    def every_node(pattern):
        return True

    assert not hostmem.has_accelerator({"JAX_PLATFORMS": "cpu"}, every_node)
    assert hostmem.has_accelerator({"JAX_PLATFORMS": "cuda,cpu"}, lambda pattern: False)
    assert hostmem.has_accelerator({}, every_node)
    assert not hostmem.has_accelerator({}, lambda pattern: False)


def test_enabled_reads_the_setting_or_what_a_restart_would_set():
    assert hostmem.enabled({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"})
    assert not hostmem.enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not hostmem.enabled({hostmem.SWITCH: "0"})


def test_thp_mode_is_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(path)) == "madvise"
    assert hostmem.thp_mode(str(tmp_path / "missing")) is None


# A child that restarts itself, then mallocs 256 MiB (ctypes: glibc's malloc itself, not
# numpy's allocator, which advises huge pages on its own), touches it, and reports how much of
# its memory is in transparent huge pages.
CHILD = textwrap.dedent("""
    import ctypes, json, os, sys
    from mae_jax.core import hostmem
    hostmem.reexec_with_hugepages()

    def huge_kib():
        with open("/proc/self/smaps_rollup") as handle:
            return next(int(line.split()[1]) for line in handle
                        if line.startswith("AnonHugePages:"))

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 256 << 20
    before = huge_kib()
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "argv": sys.argv[1:],
                      "huge_kib": huge_kib() - before}))
""")


def test_the_restart_puts_a_large_malloc_on_huge_pages():
    base = {k: v for k, v in os.environ.items() if k not in (hostmem.SWITCH, "GLIBC_TUNABLES")}
    if hostmem.hugepage_environ(base) is None:
        pytest.skip("no glibc >= 2.35 with transparent huge pages here: nothing to restart for")
    if not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("no /proc/self/smaps_rollup to read huge pages from")
    runs = {}
    for name, switch in (("off", "0"), ("on", "")):
        env = base | ({hostmem.SWITCH: switch} if switch else {})
        done = subprocess.run([sys.executable, "-c", CHILD, "--an", "argument"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        runs[name] = json.loads(done.stdout) | {"restarts": done.stderr.count("restarting")}
    assert runs["on"]["tunables"] == "glibc.malloc.hugetlb=1" and runs["on"]["restarts"] == 1
    assert runs["off"]["tunables"] == "" and runs["off"]["restarts"] == 0
    assert runs["on"]["argv"] == runs["off"]["argv"] == ["--an", "argument"]
    if hostmem.thp_mode() == "madvise":  # with `always` both runs get huge pages
        assert runs["off"]["huge_kib"] < 16 << 10, runs
        assert runs["on"]["huge_kib"] >= 128 << 10, runs
