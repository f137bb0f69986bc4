"""Tracing a model build: flax's `nnx.Rngs` against `mae_jax.models.layers.make_rngs`.

Every start of train.py, segment.py, linprobe.py and finetune.py traces the model build several
times: `nnx.eval_shape` for the graph and the optimiser's masks, `jax.eval_shape` of the train
state for the shardings, `jax.jit` for the initialisation. Each parameter initialiser draws a
key, and with `nnx.Rngs` each key drawn in a trace makes flax 0.12 check the new counter's
`.sharding`; a tracer answers that by raising an error whose message walks every operation
traced so far. `make_rngs` keeps the counters on the host (the same keys: tests/test_mae_model.py
pins them). This script times `nnx.eval_shape(lambda: build(rngs(seed)))` with each, alternating
in one process (after one warm-up build of each model with each), and prints the median of
`--repeats` builds per cell as a markdown table.

    python benchmarks/bench_trace.py
    python benchmarks/bench_trace.py --models mae:vit_base_patch16 --repeats 5

Models: `mae:<variant>` (the MAE of `mae_jax.create_mae`, decoder 512/8) and `segmenter:<config>`
(configs/<config>.py's ViT + UPerNet, 150 classes). No device work: tracing only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

import flax
import jax
from flax import nnx

import mae_jax
from mae_jax.core.state import tree_size
from mae_jax.models.layers import make_rngs
from mae_jax.segmentation import lib as segment_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODELS = ("mae:vit_base_patch16", "mae:vit_large_patch16", "mae:vit_huge_patch14",
                  "segmenter:ade20k_base")
RNGS = {"nnx.Rngs": nnx.Rngs, "make_rngs": make_rngs}


def builder(model: str):
    """rngs -> module, for a `kind:name` model."""
    kind, _, name = model.partition(":")
    if kind == "mae":
        return lambda rngs: mae_jax.create_mae(name, rngs=rngs)
    if kind == "segmenter":
        path = os.path.join(ROOT, "configs", name + ".py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return segment_lib.model_spec(module.get_config(), 150).build
    raise SystemExit(f"Unknown model {model!r}: give mae:<variant> or segmenter:<config>.")


def trace_seconds(build, make) -> float:
    start = time.perf_counter()
    nnx.eval_shape(lambda: build(make(0)))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    builders = {model: builder(model) for model in args.models.split(",")}
    load = os.getloadavg()[0]
    rows = []
    for model, build in builders.items():
        for make in RNGS.values():  # warm-up: imports, jax's caches, the model's first trace
            trace_seconds(build, make)
        seconds = {name: [] for name in RNGS}
        for repeat in range(args.repeats):  # alternating, each side first in turn
            for name, make in list(RNGS.items())[::1 if repeat % 2 == 0 else -1]:
                seconds[name].append(trace_seconds(build, make))
        abstract = nnx.eval_shape(lambda b=build: b(make_rngs(0)))
        size = tree_size(nnx.state(abstract, nnx.Param))
        old, new = (statistics.median(seconds[name]) for name in RNGS)
        rows.append(f"| {model} | {size / 1e6:.1f} | {old:.2f} | {new:.2f} | {old / new:.1f}x |")
    table = "\n".join([
        f"Model build traced (`nnx.eval_shape`), median of {args.repeats} after a warm-up, "
        "alternating; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load:.2f} at the start; jax {jax.__version__}, flax {flax.__version__}.",
        "",
        "| model | parameters (M) | nnx.Rngs (s) | make_rngs (s) | speed-up |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
