"""The benchmark suite: every benchmark of this folder at one preset's sizes in one run, and one
markdown table of what they measured against the project's speed targets.

    python benchmarks/suite.py                           # CPU preset: 18-36 minutes on 2 cores
    python benchmarks/suite.py --preset gpu --out_dir /tmp/suite    # one GPU (gpu_check.sh)
    python benchmarks/suite.py --preset smoke            # tiny sizes: checks the plumbing
    python benchmarks/suite.py --render DIR              # the table again, from DIR's reports
    python benchmarks/suite.py --only train_tiny,input   # some entries (names: --list)

Each entry runs one script of this folder in a process of its own (its output in
DIR/<entry>.txt, its report in DIR/<entry>.json); a failed or timed-out entry is reported in
the table and the suite goes on. The table (DIR/suite.md, also printed) names the machine,
the frameworks' versions, the commit, the date and the load average before and after every
entry: compare rows of one run only. This script imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite_table  # noqa: E402
from bench_input import _cpu_model  # noqa: E402  (numpy only: no JAX, no TensorFlow)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _load_hostmem():
    """mae_jax/core/hostmem.py (standard library only) without importing the mae_jax package,
    which imports JAX."""
    path = os.path.join(REPO, "mae_jax", "core", "hostmem.py")
    spec = importlib.util.spec_from_file_location("_suite_hostmem", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hostmem = _load_hostmem()
CUDA = {"JAX_PLATFORMS": "cuda"}
ALL_TOKENS = ("--encoder_all_tokens",)  # also the step with the encoder on every patch
# Three more steps traced (jax.profiler) into the run's folder, their ops in the report: where
# a GPU step's time goes, for the sessions after the one that ran it. {out} is the run folder.
PROFILE = ("--profile_dir", "{out}/{name}_profile", "--profile_steps", "3")
CPU_AUTOCAST = ("--torch_cpu_autocast",)  # torch bf16 on a CPU (official code: CUDA autocast)
CPU_DEVICES_2 = ("--cpu_devices", "2")  # train.py's mesh.cpu_devices=2 (JAX only)
SEG_BASE = ["--config", "configs/ade20k_base.py"]
VIT_B_EVAL = ["--variant", "vit_base_patch16", "--patch_size", "16", "--embed_dim", "768",
              "--depth", "12", "--num_heads", "12", "--channels", "768", "--aux_channels",
              "256", "--num_classes", "150", "--window", "512", "--stride", "341", "--scale",
              "2048,512"]
TINY_MAE = ["--image_size", "32", "--patch_size", "8", "--embed_dim", "32", "--depth", "1",
            "--num_heads", "2", "--decoder_depth", "1", "--decoder_width", "32"]


def _entry(name, kind, script, args, timeout, env=None):
    return {"name": name, "kind": kind, "script": script, "args": args, "timeout": timeout,
            "env": env or {}}


def _train(name, model, size, batch, steps, warmup, dtype="float32", timeout=900, extra=()):
    return _entry(name, "train", "bench_train_step.py",
                  ["--model", model, "--image_size", str(size), "--batch_size", str(batch),
                   "--dtype", dtype, "--steps", str(steps), "--repeats", "3", "--warmup",
                   str(warmup), *extra], timeout)


PRESETS = {
    # The CPU rows of README: float32 (the official code trains float32 on a CPU), each
    # framework in its own process; and each model in bfloat16 against PyTorch's CPU autocast.
    "cpu": [
        _train("train_tiny", "vit_tiny_patch16", 224, 32, 2, 1, extra=ALL_TOKENS),
        _train("train_base", "vit_base_patch16", 112, 8, 3, 2, extra=ALL_TOKENS),
        _train("train_large", "vit_large_patch16", 112, 4, 2, 1, extra=ALL_TOKENS),
        # mesh.cpu_devices=2 (one JAX device per core, the batch split): faster for ViT-Tiny,
        # slower for ViT-B (README), so an option; both rows in every run to keep that true.
        _train("train_tiny_2dev", "vit_tiny_patch16", 224, 32, 2, 1, extra=CPU_DEVICES_2),
        _train("train_base_2dev", "vit_base_patch16", 112, 8, 3, 2, extra=CPU_DEVICES_2),
        _train("train_tiny_bf16", "vit_tiny_patch16", 224, 32, 2, 1, "bfloat16",
               extra=CPU_AUTOCAST),
        _train("train_base_bf16", "vit_base_patch16", 112, 8, 3, 2, "bfloat16",
               extra=CPU_AUTOCAST),
        _train("train_large_bf16", "vit_large_patch16", 112, 4, 2, 1, "bfloat16",
               extra=CPU_AUTOCAST),
        _entry("input", "input", "bench_input.py", ["--seconds", "6", "--rounds", "3"], 900),
        _entry("seg_input", "seg_input", "bench_seg_input.py",
               ["--seconds", "6", "--rounds", "3"], 900),
        # Needs timm's files (`pip install --no-deps timm`); without them this row fails alone.
        _entry("finetune_input", "finetune_input", "bench_finetune_input.py",
               ["--seconds", "6", "--rounds", "3"], 900),
        _entry("on_device", "on_device", "bench_on_device.py",
               ["--image_size", "64", "--batch_size", "32", "--num_images", "5000", "--steps",
                "3", "--repeats", "4", "--warmup", "2"], 600),
        _entry("on_device_finetune", "on_device", "bench_on_device.py",
               ["--task", "finetune", "--image_size", "64", "--batch_size", "32",
                "--num_images", "5000", "--steps", "3", "--repeats", "4", "--warmup", "2"], 600),
        _entry("seg_train", "seg_train", "bench_seg_train_step.py",
               [*SEG_BASE, "--image_size", "128", "--batch_size", "2", "--dtype", "float32",
                "--frameworks", "jax,torch", "--no_device_photometric", "--steps", "2",
                "--repeats", "3", "--warmup", "1"], 900),
        _entry("seg_eval", "seg_eval", "bench_seg_eval.py", ["--num_images", "50"], 900),
    ],
    # One H200 or H100, bfloat16, the sizes gpu_check.sh ran before this suite; the input's host
    # parts need TensorFlow (absent there): their device parts only. The segmentation step
    # runs without its PyTorch row (transformers' BEiT in float32 on a CPU is what it pins).
    # Most important first: the suite may stop starting entries (gpu_check.sh). The four
    # targets' entries start within 170 + 90 + 90 s even when each runs to its timeout, so
    # ViT-B's MFU, the UPerNet step's memory and the evaluation's images/s are always measured
    # (ViT-Tiny's MFU unless the three before all time out).
    "gpu": [
        _train("train_base", "vit_base_patch16", 224, 256, 5, 2, "bfloat16", 170,
               (*ALL_TOKENS, *PROFILE)),
        _entry("seg_train_b2", "seg_train", "bench_seg_train_step.py",
               [*SEG_BASE, "--batch_size", "2", "--steps", "3", "--repeats", "2", "--warmup",
                "1"], 90),
        _entry("seg_eval", "seg_eval", "bench_seg_eval.py",
               [*VIT_B_EVAL, "--dtype", "bfloat16", "--uint8", "--num_images", "24",
                "--repeats", "1", "--paths", "after"], 90),  # 3 full calls of 8 images
        _train("train_tiny", "vit_tiny_patch16", 224, 256, 5, 2, "bfloat16", 110, ALL_TOKENS),
        _entry("on_device", "on_device", "bench_on_device.py",
               ["--batch_size", "256", "--dtype", "bfloat16", "--num_images", "10000",
                "--steps", "5", "--repeats", "2"], 60),
        _entry("on_device_finetune", "on_device", "bench_on_device.py",
               ["--task", "finetune", "--batch_size", "256", "--dtype", "bfloat16",
                "--num_images", "10000", "--steps", "5", "--repeats", "2"], 70),
        _entry("input_device", "input", "bench_input.py", ["--device_part", "--seconds", "5"],
               40, CUDA),
        _entry("seg_input_device", "seg_input", "bench_seg_input.py",
               ["--device_part", "--seconds", "5"], 40, CUDA),
        _entry("finetune_input_device", "finetune_input", "bench_finetune_input.py",
               ["--device_part", "--seconds", "5"], 50, CUDA),
        # JAX takes at most 75% of the device's memory by default (~60 GiB of an H100's 80).
        _entry("seg_train_b16", "seg_train", "bench_seg_train_step.py",
               [*SEG_BASE, "--batch_size", "16", "--steps", "3", "--repeats", "2", "--warmup",
                "1"], 70, {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".92"}),
        # Last, when time is left: ViT-L in bfloat16, and ViT-B in float32 at each framework's
        # default matmul precision (JAX: TF32 allowed; PyTorch: TF32 off for matmuls).
        _train("train_large", "vit_large_patch16", 224, 128, 3, 1, "bfloat16", 150, ALL_TOKENS),
        _train("train_base_fp32", "vit_base_patch16", 224, 128, 3, 1, "float32", 150,
               ALL_TOKENS),
    ],
    # Tiny sizes, a few minutes on a CPU: every script and the table, numbers meaningless.
    "smoke": [
        _entry("train_tiny", "train", "bench_train_step.py",
               [*TINY_MAE, "--batch_size", "4", "--steps", "1", "--repeats", "2", "--warmup",
                "0", "--encoder_all_tokens", *PROFILE], 300),
        _entry("input", "input", "bench_input.py",
               ["--seconds", "0.3", "--rounds", "1", "--images", "64", "--max_cores", "1"], 300),
        _entry("seg_input", "seg_input", "bench_seg_input.py",
               ["--seconds", "0.3", "--rounds", "1", "--images", "16", "--max_cores", "1"], 300),
        # The gpu preset's TensorFlow-free device parts too, so that a rehearsal of
        # gpu_check.sh in an environment like the GPU machine's (no TensorFlow) runs them; the
        # two entries above fail alone there.
        _entry("input_device", "input", "bench_input.py", ["--device_part", "--seconds", "0.3"],
               300),
        _entry("seg_input_device", "seg_input", "bench_seg_input.py",
               ["--device_part", "--seconds", "0.3"], 300),
        _entry("finetune_input_device", "finetune_input", "bench_finetune_input.py",
               ["--device_part", "--seconds", "0.5"], 300),
        _entry("on_device", "on_device", "bench_on_device.py",
               [*TINY_MAE, "--batch_size", "8", "--num_images", "64", "--steps", "1",
                "--repeats", "2", "--warmup", "0"], 300),
        _entry("on_device_finetune", "on_device", "bench_on_device.py",
               ["--task", "finetune", *TINY_MAE[:10], "--batch_size", "8", "--num_images", "64",
                "--steps", "1", "--repeats", "2", "--warmup", "0"], 300),
        _entry("seg_train", "seg_train", "bench_seg_train_step.py",
               ["--batch_size", "4", "--steps", "1", "--repeats", "2", "--warmup", "0"], 300),
        _entry("seg_eval", "seg_eval", "bench_seg_eval.py",
               ["--num_images", "4", "--repeats", "1"], 300),
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--out_dir", default="",
                        help="Reports, logs and suite.md go here (default: a new folder "
                             "benchmark_runs/<preset>-<UTC time>).")
    parser.add_argument("--only", default="", help="Comma list of entry names (see --list).")
    parser.add_argument("--render", default="", metavar="DIR",
                        help="Run nothing: print the table of the reports in DIR.")
    parser.add_argument("--stop_starting_after", type=float, default=0.0, metavar="SECONDS",
                        help="Start no entry after this many seconds (0: no limit); the "
                             "skipped ones are listed.")
    parser.add_argument("--table_copy", default="", metavar="PATH",
                        help="Also write the table here after every entry (gpu_check.sh: "
                             "$OUT/suite.md, so a run stopped at its time limit keeps it).")
    parser.add_argument("--list", action="store_true", help="Print the entries and exit.")
    args = parser.parse_args(argv)
    names = [e["name"] for e in PRESETS[args.preset]]
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    if set(args.only) - set(names):
        parser.error(f"--only: no entry {sorted(set(args.only) - set(names))} in preset "
                     f"{args.preset!r}; its entries: {', '.join(names)}")
    if args.render and not os.path.isfile(os.path.join(args.render, "suite.json")):
        parser.error(f"--render {args.render}: no suite.json there (a suite run's --out_dir)")
    # Before any entry runs (QA: tracebacks, or every entry skipped).
    if args.stop_starting_after < 0:
        parser.error(f"--stop_starting_after {args.stop_starting_after:g}: give seconds >= 0 "
                     "(0: no limit)")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"--out_dir {args.out_dir} is a file: give a folder (new or a run's)")
    copy_dir = os.path.dirname(os.path.abspath(args.table_copy)) if args.table_copy else ""
    if copy_dir and not os.path.isdir(copy_dir):
        parser.error(f"--table_copy {args.table_copy}: no folder {copy_dir}")
    return args


def command(entry: dict, out_dir: str) -> list[str]:
    args = [arg.format(out=out_dir, name=entry["name"]) for arg in entry["args"]]
    return [sys.executable, os.path.join(HERE, entry["script"]), *args, "--out_json",
            os.path.join(out_dir, entry["name"] + ".json")]


def run_entry(entry: dict, out_dir: str) -> dict:
    """Runs one entry; returns its record (command, exit status, seconds, load averages)."""
    argv = command(entry, out_dir)
    env = {**os.environ, **entry["env"], "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    record = {"name": entry["name"], "kind": entry["kind"], "command": " ".join(argv[1:]),
              "load_before": os.getloadavg()[0]}
    started = time.perf_counter()
    report = os.path.join(out_dir, entry["name"] + ".json")
    if os.path.exists(report):  # an earlier run's, in a reused folder: not this run's result
        os.remove(report)
    with open(os.path.join(out_dir, entry["name"] + ".txt"), "w") as log:
        # Its own session: a timeout stops the processes the entry started too (QA: a
        # bench_train_step child ran on, loading the machine under the next entries).
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   start_new_session=True)
        try:
            record["returncode"] = process.wait(timeout=entry["timeout"])
        except subprocess.TimeoutExpired:
            record["returncode"] = f"timed out after {entry['timeout']} s"
        finally:  # also on Ctrl-C or the suite's SIGTERM (`stop_on_sigterm`): the entry is
            if process.poll() is None:  # no longer in the suite's process group
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    record.update(seconds=time.perf_counter() - started, load_after=os.getloadavg()[0])
    return record


def machine() -> dict:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    return {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "gpu": gpu.stdout.strip().replace("\n", ", ") if gpu and gpu.returncode == 0
            else None, "malloc_hugepages": hostmem.enabled(), "commit": commit(),
            "versions": versions()}


def commit() -> str | None:
    """The checkout's commit ("+ changes" when tracked files differ from it); None outside a
    git checkout (the GPU machine gets a copy of the working tree, maybe without .git)."""
    def git(*args):
        done = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    if not shutil.which("git") or not (head := git("rev-parse", "--short", "HEAD")):
        return None
    return head + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def versions() -> dict:
    """The installed versions of the frameworks measured (read from the package metadata:
    nothing imported)."""
    from importlib import metadata

    found = {}
    for name in ("jax", "jaxlib", "flax", "torch", "tensorflow", "tensorflow-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name.removesuffix("-cpu")] = metadata.version(name)
    return found


def run(args: argparse.Namespace) -> str:
    entries = [e for e in PRESETS[args.preset] if not args.only or e["name"] in args.only]
    stamp = datetime.datetime.now(datetime.UTC)
    out_dir = args.out_dir or os.path.join(
        REPO, "benchmark_runs", f"{args.preset}-{stamp:%Y%m%dT%H%M%SZ}")
    os.makedirs(out_dir, exist_ok=True)
    info = {"preset": args.preset, "started_utc": stamp.isoformat(timespec="seconds"),
            "machine": machine(), "load_before": os.getloadavg(), "entries": []}
    cores = info["machine"]["cores"]
    print(f"Suite {args.preset!r}, {len(entries)} entries -> {out_dir}; load average "
          f"{info['load_before'][0]:.2f} on {cores} cores", flush=True)
    if info["load_before"][0] > 0.25 * cores:
        print("WARNING: the machine is not quiet (1-minute load average "
              f"{info['load_before'][0]:.2f}); timings compare only within this run.", flush=True)
    started = time.perf_counter()

    def save() -> None:  # suite.json and the table kept up to date, for a run stopped early
        with open(os.path.join(out_dir, "suite.json"), "w") as handle:
            json.dump(info, handle, indent=2)
        text = render(out_dir)
        if args.table_copy:
            with open(args.table_copy, "w") as handle:
                handle.write(text)

    for entry in entries:
        record = {"name": entry["name"], "kind": entry["kind"],
                  "command": " ".join(command(entry, out_dir)[1:])}
        stale = os.path.join(out_dir, entry["name"] + ".json")
        if os.path.exists(stale):  # an earlier run's, in a reused folder: not this run's
            os.remove(stale)
        if args.stop_starting_after and time.perf_counter() - started > args.stop_starting_after:
            info["entries"].append(record | {"returncode": "skipped: out of time"})
        else:
            print(f"[{time.perf_counter() - started:6.0f} s] {entry['name']}: "
                  f"{entry['script']} {' '.join(entry['args'])}", flush=True)
            # Listed while it runs: a suite stopped during it still shows the rows it wrote.
            info["entries"].append(record | {"returncode": "did not finish: the suite stopped"})
            save()
            info["entries"][-1] = run_entry(entry, out_dir)
        save()
    info["load_after"] = os.getloadavg()
    info["seconds"] = time.perf_counter() - started
    save()
    return out_dir


def render(out_dir: str) -> str:
    """suite.md of a run's folder; returns its text."""
    with open(os.path.join(out_dir, "suite.json")) as handle:
        info = json.load(handle)
    reports = {}
    for record in info["entries"]:
        path = os.path.join(out_dir, record["name"] + ".json")
        if os.path.exists(path):  # a failed entry's report may hold the rows that ran
            with open(path) as handle:
                reports[record["name"]] = json.load(handle)
    text = suite_table.markdown(info, reports)
    with open(os.path.join(out_dir, "suite.md"), "w") as handle:
        handle.write(text)
    return text


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.list:
        for entry in PRESETS[args.preset]:  # --only's, if given (QA: all of them)
            if entry["name"] in (args.only or [entry["name"]]):
                print(f"{entry['name']}: {entry['script']} {' '.join(entry['args'])}")
        return ""
    out_dir = args.render or run(args)
    text = render(out_dir)
    print(text)
    print("Wrote", os.path.join(out_dir, "suite.md"))
    return text


def stop_on_sigterm() -> None:
    """SIGTERM (gpu_check.sh's `timeout 420`) as an exception, so that `run_entry` stops the
    running entry's processes too: they are in a session of their own (review)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


if __name__ == "__main__":
    stop_on_sigterm()
    main()
