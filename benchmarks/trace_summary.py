"""Where a traced step's time goes: the ops of a `jax.profiler` trace, summed by name.

    python benchmarks/trace_summary.py DIR [--steps N] [--top 25]

DIR: a folder given to `jax.profiler.start_trace(..., create_perfetto_trace=True)` (e.g.
`bench_train_step.py --profile_dir`, or a run's `workdir/profile` from `config.profile_steps`);
the newest `perfetto_trace.json.gz` below it is read. On a GPU the ops are those of the device
(`/device:...` processes; their "XLA Ops" line when the trace has one, so kernels are not
counted twice); on a CPU, XLA's own threads (`tf_XLA...`) without Python frames and thread-pool
bookkeeping. Prints two markdown tables: the ops (calls, total ms, ms per step with --steps,
share of the listed time), then the kinds of op (names without their ".N").

On a CPU, read the `dot` rows with care: XLA:CPU hands a large `dot` (its own Eigen product,
e.g. a weight gradient) to its thread pool and ends the traced event there, so the product's
time is not in its row but in the rows of the ops that run beside it (a YNNPACK product that
shares the cores with it takes about twice its time alone). The summary says so when the
trace has such ops (`note`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

# Host-side events of XLA:CPU's thread pools, not ops.
_BOOKKEEPING = ("ThreadpoolListener::", "SlinkyThreadPool::", "ThunkExecutor::", "end: ",
                "Wait for donation holds", "PythonRefManager::", "Wait: pending_threads",
                "Wait for rendezvous")


ASYNC_DOT_NOTE = (
    "Note: XLA:CPU runs its `dot` ops (Eigen products, e.g. weight gradients) on its thread "
    "pool after their traced event ends: their rows show the launch, and their time shows in "
    "the ops that ran beside them (a product sharing the cores takes up to twice its time "
    "alone). Time products alone with benchmarks/bench_products.py.")
_DOT = re.compile(r"dot(_general)?(\.\d+)?")


def newest_trace(directory: str) -> str:
    paths = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"No perfetto_trace.json.gz below {directory}: trace with "
                                "jax.profiler.start_trace(DIR, create_perfetto_trace=True).")
    return max(paths, key=os.path.getmtime)


def op_events(events: list[dict]) -> tuple[str, list[dict]]:
    """('device' | 'host', the complete events that are ops)."""
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") == "M" and event.get("name") == "process_name":
            processes[event["pid"]] = event["args"]["name"]
        elif event.get("ph") == "M" and event.get("name") == "thread_name":
            threads[(event["pid"], event["tid"])] = event["args"]["name"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if devices:
        on_device = [e for e in complete if e["pid"] in devices]
        line = {id(e): threads.get((e["pid"], e.get("tid")), "") for e in on_device}
        xla_ops = [e for e in on_device if line[id(e)] == "XLA Ops"]
        return "device", xla_ops or [e for e in on_device
                                     if line[id(e)] not in ("XLA Modules", "Steps")]
    xla = [e for e in complete
           if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
           and not e["name"].startswith(("$", *_BOOKKEEPING))]
    return "host", xla


def summarize(directory: str, *, steps: int = 1, top: int = 25) -> dict:
    """{"trace", "where", "total_ms", "rows": [{"op", "calls", "total_ms", "ms_per_step",
    "share"}], "kinds": [...], "note"}: the `top` ops by total time; `note` is
    `ASYNC_DOT_NOTE` for a CPU trace with `dot` ops, else None."""
    path = newest_trace(directory)
    with gzip.open(path) as handle:
        data = json.load(handle)
    events = data["traceEvents"] if isinstance(data, dict) else data
    where, ops = op_events(events)
    totals, calls = collections.Counter(), collections.Counter()
    for event in ops:
        totals[event["name"]] += event["dur"] / 1000.0  # microseconds -> ms
        calls[event["name"]] += 1
    total = sum(totals.values())
    kinds, kind_calls = collections.Counter(), collections.Counter()
    for name, ms in totals.items():  # "fusion.12" and "fusion.40" are one kind
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] += ms
        kind_calls[kind] += calls[name]

    def rows(counter, counts, n):
        return [{"op": name, "calls": counts[name], "total_ms": ms, "ms_per_step": ms / steps,
                 "share": ms / total if total else 0.0} for name, ms in counter.most_common(n)]

    async_dots = where == "host" and any(_DOT.fullmatch(name) for name in totals)
    return {"trace": path, "where": where, "total_ms": total, "rows": rows(totals, calls, top),
            "kinds": rows(kinds, kind_calls, 12), "note": ASYNC_DOT_NOTE if async_dots else None}


def format_summary(summary: dict, steps: int = 1) -> str:
    lines = [f"Ops of {summary['trace']} ({summary['where']}; {summary['total_ms']:.1f} ms in "
             f"all, {steps} step(s)):", "",
             "| op | calls | total ms | ms / step | share |", "|---|---:|---:|---:|---:|"]
    lines += [f"| `{r['op'][:80]}` | {r['calls']} | {r['total_ms']:.2f} | {r['ms_per_step']:.2f} "
              f"| {r['share']:.1%} |" for r in summary["rows"]]
    lines += ["", "| kind of op | calls | total ms | ms / step | share |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| `{r['op'][:80]}` | {r['calls']} | {r['total_ms']:.2f} | "
              f"{r['ms_per_step']:.2f} | {r['share']:.1%} |" for r in summary["kinds"]]
    if summary.get("note"):
        lines += ["", summary["note"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=1, help="Steps in the trace (ms / step).")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    summary = summarize(args.directory, steps=args.steps, top=args.top)
    print(format_summary(summary, args.steps))
    return summary


if __name__ == "__main__":
    main()
