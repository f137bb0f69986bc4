"""Where a traced step's time goes: the ops of a `jax.profiler` trace, summed by name.

    python benchmarks/trace_summary.py DIR [--steps N] [--top 25]

DIR: a folder given to `jax.profiler.start_trace(..., create_perfetto_trace=True)` (e.g.
`bench_train_step.py --profile_dir`, or a run's `workdir/profile` from `config.profile_steps`);
the newest `perfetto_trace.json.gz` below it is read. On a GPU the ops are those of the device
(`/device:...` processes; their "XLA Ops" line when the trace has one, so kernels are not
counted twice); on a CPU, XLA's own threads (`tf_XLA...`) without Python frames and thread-pool
bookkeeping. Prints two markdown tables: the ops (calls, total ms, ms per step with --steps,
share of the listed time), then the kinds of op (names without their ".N").

On a CPU the tables count each op's own event. XLA:CPU also records when each op completes
(`end: NAME`), and some complete long after their event: a large `dot` (its own Eigen product,
e.g. a weight gradient) is handed to the thread pool and runs on beside the ops that follow
(which then run slower for sharing the cores), and a loop split over the threads waits for its
other part. Their own events miss that time, so the tables can add up to less than the wall
time; a third table lists these ops with their time from start to end, which overlaps other
ops' (`async` and `note`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

# XLA:CPU's mark of an op's completion, "end: NAME" (`host_op_ends`).
_END = "end: "
# Host-side events of XLA:CPU's thread pools, not ops.
_BOOKKEEPING = ("ThreadpoolListener::", "SlinkyThreadPool::", "ThunkExecutor::", _END,
                "Wait for donation holds", "PythonRefManager::", "Wait: pending_threads",
                "Wait for rendezvous")


ASYNC_NOTE = (
    "Note: the ops of the last table ran on after their traced event (XLA:CPU's thread pool: "
    "its Eigen products, e.g. weight gradients, and loops split over the threads). The first "
    "two tables count only their events; their start-to-end times overlap the ops beside them, "
    "which run slower for sharing the cores. Time products alone with "
    "benchmarks/bench_products.py.")


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


def host_op_ends(events: list[dict], ops: list[dict]) -> list[float | None]:
    """Each host op's time in ms from its start to its `end: NAME` event (the first one after
    its start, in order per name); None without one."""
    ends = collections.defaultdict(collections.deque)
    for event in sorted((e for e in events if e.get("ph") == "X"
                         and str(e.get("name", "")).startswith(_END)), key=lambda e: e["ts"]):
        ends[event["name"][len(_END):]].append(event["ts"])
    times: list[float | None] = [None] * len(ops)
    for index in sorted(range(len(ops)), key=lambda i: ops[i]["ts"]):
        event = ops[index]
        queue = ends.get(event["name"])
        while queue and queue[0] < event["ts"]:  # an end whose start is not in the trace
            queue.popleft()
        if queue:
            times[index] = (queue.popleft() - event["ts"]) / 1000.0
    return times


def summarize(directory: str, *, steps: int = 1, top: int = 25) -> dict:
    """{"trace", "where", "total_ms", "rows": [{"op", "calls", "total_ms", "ms_per_step",
    "share"}], "kinds": [...], "async": [{"op", "calls", "event_ms", "start_to_end_ms"}],
    "note"}: the `top` ops by the time of their own events; `async` (a host trace): the ops
    that completed over 1 ms and 10% after their event ended, by start-to-end time, and `note`
    (`ASYNC_NOTE`) when there are any."""
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

    late = collections.defaultdict(lambda: [0, 0.0, 0.0])  # calls, event ms, start-to-end ms
    if where == "host":
        for event, span in zip(ops, host_op_ends(events, ops), strict=True):
            own = event["dur"] / 1000.0
            if span is not None and span - own > max(1.0, 0.1 * span):
                entry = late[event["name"]]
                entry[0] += 1
                entry[1] += own
                entry[2] += span
    late_rows = [{"op": name, "calls": c, "event_ms": own, "start_to_end_ms": span}
                 for name, (c, own, span) in sorted(late.items(), key=lambda kv: -kv[1][2])]
    return {"trace": path, "where": where, "total_ms": total, "rows": rows(totals, calls, top),
            "kinds": rows(kinds, kind_calls, 12), "async": late_rows[:top],
            "note": ASYNC_NOTE if late_rows else None}


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
    if summary.get("async"):
        lines += ["", "| ran on after its event | calls | event ms | start to end ms |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{r['op'][:80]}` | {r['calls']} | {r['event_ms']:.2f} | "
                  f"{r['start_to_end_ms']:.2f} |" for r in summary["async"]]
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
