"""The matrix products of one MAE train step, each timed alone in JAX and in PyTorch.

    python benchmarks/bench_products.py --model vit_tiny_patch16 --image_size 224 --batch_size 32

A train step is mostly matrix products (Linear forward, input gradient and weight gradient;
attention's six batched products). This lists every product `bench_train_step.py`'s step runs,
with its count per step, and times each one alone in both frameworks in one process (same
machine, same threads; each framework in its own storage layout: our kernels are [in, out]
(forward x @ W, input gradient g @ W^T, weight gradient x^T @ g), torch's weights are [out,
in] (x @ W^T, g @ W, g^T @ x); attention heads-major [N, H, T, Dh] in both). The last line sums
count x time: the step's time if it were nothing but its products, for each framework. When
JAX's products alone take about as long as torch's, no rewrite of the rest of the step can make
it much faster than torch's: that is what bounds ours / official on a CPU.

Not counted: the patch embedding's input gradient (the images need none), LayerNorm, softmax,
GELU, the loss, the optimiser. float32 only.

The list is the official step's: ours (`MAE.loss`) computes the decoder's last block and head
for the removed patches only, a few percent fewer FLOPs (benchmarks/README). Products timed
alone each write to fresh memory, which costs attention's small products more than a step
does (benchmarks/README, 2026-12-05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train_step as step_bench  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mae_jax.core import hostmem  # noqa: E402
from mae_jax.models.mae import num_visible  # noqa: E402
from mae_jax.models.registry import VARIANTS  # noqa: E402

# Operand layouts: "nn" A[m, k] B[k, n]; "nt" A[m, k] B[n, k]; "tn" A[k, m] B[k, n].
LINEAR_FORMS = {  # pass -> (ours, torch's)
    "forward": ("nn", "nt"), "input grad": ("nt", "nn"), "weight grad": ("tn", "tn")}
ATTENTION_FORMS = {"QK^T": "nt", "PV": "nn", "dP = dO V^T": "nt", "dV = P^T dO": "tn",
                   "dQ = dS K": "nn", "dK = dS^T Q": "tn"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16", choices=sorted(VARIANTS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--calls", type=int, default=5, help="Timed calls per product.")
    parser.add_argument("--frameworks", default="jax,torch")
    args = parser.parse_args(argv)
    if not args.frameworks or set(args.frameworks.split(",")) - {"jax", "torch"}:
        parser.error(f"--frameworks {args.frameworks}: give jax, torch or jax,torch")
    return args


def linear_products(name, count, rows, fan_in, fan_out):
    """The three products of a Linear [fan_in -> fan_out] over `rows` rows, count times."""
    shapes = {"forward": (rows, fan_in, fan_out), "input grad": (rows, fan_out, fan_in),
              "weight grad": (fan_in, rows, fan_out)}
    # torch's weight gradient is [out, in]: g^T @ x.
    torch_shapes = shapes | {"weight grad": (fan_out, rows, fan_in)}
    return [{"product": f"{name} {kind}", "count": count, "batch": 1, "mnk": shapes[kind],
             "torch mnk": torch_shapes[kind], "forms": LINEAR_FORMS[kind]} for kind in shapes]


def step_products(dims: dict[str, int], image_size: int, batch: int, mask_ratio: float):
    """Every matrix product of one MAE train step (forward + backward) as
    {"product", "count", "batch", "mnk": (m, k, n), "forms": (ours, torch's)}, and "torch mnk"
    where torch's operands differ (its [out, in] weights)."""
    patch = dims["patch_size"]
    length = (image_size // patch) ** 2
    # The patch embedding is a convolution in torch; timed here as the same product.
    out = [{"product": "patch embed forward", "count": 1, "batch": 1,
            "mnk": (batch * length, 3 * patch * patch, dims["embed_dim"]), "forms": ("nn", "nt")},
           {"product": "patch embed weight grad", "count": 1, "batch": 1,
            "mnk": (3 * patch * patch, batch * length, dims["embed_dim"]),
            "torch mnk": (dims["embed_dim"], batch * length, 3 * patch * patch),
            "forms": ("tn", "tn")}]
    stacks = (("encoder", dims["depth"], 1 + num_visible(length, mask_ratio), dims["embed_dim"],
               dims["num_heads"]),
              ("decoder", dims["decoder_depth"], 1 + length, dims["decoder_embed_dim"],
               dims["decoder_num_heads"]))
    for name, depth, tokens, width, heads in stacks:
        rows = batch * tokens
        out += linear_products(f"{name} qkv", depth, rows, width, 3 * width)
        out += linear_products(f"{name} proj", depth, rows, width, width)
        out += linear_products(f"{name} fc1", depth, rows, width, 4 * width)
        out += linear_products(f"{name} fc2", depth, rows, 4 * width, width)
        head = width // heads
        shapes = {"QK^T": (tokens, head, tokens), "PV": (tokens, tokens, head),
                  "dP = dO V^T": (tokens, head, tokens), "dV = P^T dO": (tokens, tokens, head),
                  "dQ = dS K": (tokens, tokens, head), "dK = dS^T Q": (tokens, tokens, head)}
        out += [{"product": f"{name} attention {kind}", "count": depth, "batch": batch * heads,
                 "mnk": shapes[kind], "forms": (form, form)}
                for kind, form in ATTENTION_FORMS.items()]
    embed, decoder = dims["embed_dim"], dims["decoder_embed_dim"]
    out += linear_products("decoder embed", 1, batch * (1 + num_visible(length, mask_ratio)),
                           embed, decoder)
    out += linear_products("decoder pred", 1, batch * (1 + length), decoder, 3 * patch * patch)
    return out


def operands(form: str, batch: int, m: int, k: int, n: int, rng: np.random.Generator):
    lead = (batch,) if batch > 1 else ()
    a = (k, m) if form == "tn" else (m, k)
    b = (n, k) if form == "nt" else (k, n)
    return (rng.standard_normal(lead + a, dtype=np.float32),
            rng.standard_normal(lead + b, dtype=np.float32))


def jax_product(form: str, batched: bool):
    contract = {"nn": (1, 0), "nt": (1, 1), "tn": (0, 0)}[form]
    offset = int(batched)
    dimension_numbers = (((contract[0] + offset,), (contract[1] + offset,)),
                         ((0,), (0,)) if batched else ((), ()))
    return jax.jit(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers))


def torch_product(form: str):
    import torch

    def transposed(x):
        return x.transpose(-2, -1)

    return {"nn": torch.matmul, "nt": lambda a, b: torch.matmul(a, transposed(b)),
            "tn": lambda a, b: torch.matmul(transposed(a), b)}[form]


def median_ms(call, finish, calls: int) -> float:
    finish(call())  # warm-up (JAX: compile)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        finish(call())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_products(products, frameworks, calls: int) -> None:
    """Adds "<framework> ms" and "<framework> GFLOP/s" to each product."""
    rng = np.random.default_rng(0)
    for product in products:
        batch = product["batch"]
        flops = 2 * batch * int(np.prod(product["mnk"]))
        for framework, form in zip(("jax", "torch"), product["forms"], strict=True):
            if framework not in frameworks:
                continue
            m, k, n = product.get(f"{framework} mnk", product["mnk"])
            a, b = operands(form, batch, m, k, n, rng)
            if framework == "jax":
                fn, a, b = jax_product(form, batch > 1), jax.device_put(a), jax.device_put(b)
                ms = median_ms(lambda fn=fn, a=a, b=b: fn(a, b), jax.block_until_ready, calls)
            else:
                import torch

                fn, a, b = torch_product(form), torch.from_numpy(a), torch.from_numpy(b)
                ms = median_ms(lambda fn=fn, a=a, b=b: fn(a, b), lambda _: None, calls)
            product[f"{framework} ms"] = ms
            product[f"{framework} GFLOP/s"] = flops / ms / 1e6


def format_table(products, frameworks) -> str:
    header = ["product", "count", "batch x (m, k, n), ours", "forms (ours, torch)"]
    for framework in frameworks:
        header += [f"{framework} ms", f"{framework} GFLOP/s"]
    if len(frameworks) == 2:
        header.append("jax / torch")
    lines = [header, ["---"] * len(header)]
    for p in products:
        line = [p["product"], str(p["count"]), f"{p['batch']} x {p['mnk']}", ", ".join(p["forms"])]
        for framework in frameworks:
            line += [f"{p[f'{framework} ms']:.2f}", f"{p[f'{framework} GFLOP/s']:.0f}"]
        if len(frameworks) == 2:
            line.append(f"{p['jax ms'] / p['torch ms']:.2f}")
        lines.append(line)
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Returns {"machine", "settings", "products", "step_ms": {framework: sum of count x ms}}."""
    args = parse_args(argv)
    frameworks = [f for f in ("jax", "torch") if f in args.frameworks.split(",")]
    if "torch" in frameworks:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    step_args = step_bench.parse_args(["--model", args.model, "--image_size",
                                       str(args.image_size), "--batch_size",
                                       str(args.batch_size)])
    dims = step_bench.model_dims(step_bench.build_config(step_args))
    machine = step_bench.machine_info()
    print("Machine:", ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("Load average (1, 5, 15 min):", os.getloadavg())
    products = step_products(dims, args.image_size, args.batch_size, args.mask_ratio)
    time_products(products, frameworks, args.calls)
    print(format_table(products, frameworks))
    totals = {f: sum(p["count"] * p[f"{f} ms"] for p in products) for f in frameworks}
    flops = sum(p["count"] * 2 * p["batch"] * np.prod(p["mnk"]) for p in products)
    print(f"One step's products ({flops / 1e9:.1f} GFLOP), count x median time summed: "
          + ", ".join(f"{f} {ms:.0f} ms" for f, ms in totals.items())
          + (f" (jax / torch {totals['jax'] / totals['torch']:.2f})" if len(totals) == 2 else ""))
    print("Load average after (1, 5, 15 min):", os.getloadavg())
    return {"machine": machine, "settings": vars(args) | {"model_dims": dims},
            "products": products, "step_ms": totals}


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()
    main()
