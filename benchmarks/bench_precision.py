"""How far bfloat16 compute drifts from float32: per-block activation error and the loss gap.

Two measurements, printed as markdown tables:

1. Per-block activation error of the ViT-B/16 encoder (official structure; the official
   initialisation, and randomized weights that exercise every parameter; 224 px, a few
   generated images, all patches): ||bf16 - fp32|| / ||fp32|| for every block output and the
   final norm, with the same weights in both. Two bfloat16 policies:
   - "policy" (mae_jax's): float32 residual stream and LayerNorm statistics, float32 attention
     logits / softmax, bf16 matmuls (what the official fp16-autocast runs compute);
   - "all bf16" (the previous behaviour, emulated with the same modules): the residual stream,
     position tables and cls token rounded to bfloat16 as well.
2. The MAE loss after a short demo-size pretraining run (configs/demo.py's model and
   optimiser: vit_micro_patch4 at 32 px, 2-block 64-wide decoder, AdamW 0.9/0.95, wd 0.05,
   batch 64, lr 2e-3, warmup then cosine) in float32 and in bfloat16 from the same
   initialisation, data order and masks.

    python benchmarks/bench_precision.py                    # CPU: a few minutes on 2 cores
    python benchmarks/bench_precision.py --train_steps 600  # the demo's full length

Timings are not measured; the load average is printed because a loaded machine only slows it.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mae_jax
from mae_jax.core import hostmem
from mae_jax.data.constants import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.data.generated import generate_image
from mae_jax.models.layers import make_rngs


def load_average() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def generated_images(count: int, size: int, seed: int) -> np.ndarray:
    """[count, size, size, 3] float32, ImageNet-normalised procedural images."""
    rng = np.random.default_rng(seed)
    images = np.stack([generate_image(rng, size) for _ in range(count)]).astype(np.float32)
    return (images / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ----------------------------------------------------------------------------- per-block error
@nnx.jit
def blocks_with_policy(encoder, images):
    """The model's own forward: [block outputs..., final norm], each [N, 1 + L, D]."""
    x, outputs = encoder.encode(
        encoder.embed(images), return_blocks=tuple(range(encoder.depth))
    )
    return [*outputs, x]


@nnx.jit
def blocks_all_bfloat16(encoder, images):
    """The previous policy, emulated: every residual-stream tensor rounded to bfloat16.

    A Block keeps its input's dtype for the residual stream, so feeding it bfloat16 gives the
    old behaviour (its LayerNorms then see bfloat16 inputs, as nnx.LayerNorm(dtype=bf16) did).
    """
    dtype = jnp.bfloat16
    tokens = encoder.patch_embed(images).astype(dtype)
    pos = encoder.pos_embed[...].astype(dtype)
    x = tokens + pos[:, 1:]
    cls = (encoder.cls_token[...] + encoder.pos_embed[...][:, :1]).astype(dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
    outputs = []
    for block in encoder.blocks:
        x = block(x)
        outputs.append(x)
    return [*outputs, encoder.norm(x)]


def randomize(encoder, seed: int) -> None:
    """Every parameter random, as tests' `torch_mae.randomize_`: kernels N(0, 1/fan_in),
    LayerNorm scales 1 + N(0, 0.2), biases and layer norm shifts N(0, 0.2), cls N(0, 0.5)."""
    state = nnx.state(encoder, nnx.Param)
    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, (path, variable) in zip(keys, flat, strict=True):
        noise = jax.random.normal(key, variable[...].shape)
        name = str(path[-1])
        if name == "kernel":
            value = noise / np.sqrt(np.prod(variable[...].shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.2 * noise
        elif name == "cls_token":
            value = 0.5 * noise
        else:
            value = 0.2 * noise
        variable[...] = value
    nnx.update(encoder, state)


def per_block_errors(
    num_images: int, seed: int, attention_impl: str, randomized: bool
) -> tuple[list[float], list[float]]:
    images = jnp.asarray(generated_images(num_images, 224, seed))
    make = lambda dtype: mae_jax.create_encoder(  # noqa: E731
        "vit_base_patch16", dtype=dtype, attention_impl=attention_impl, rngs=make_rngs(seed)
    )
    encoder32, encoder16 = make(jnp.float32), make(jnp.bfloat16)
    if randomized:
        randomize(encoder32, seed)
        nnx.update(encoder16, nnx.state(encoder32, nnx.Param))
    same = jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)),
        nnx.state(encoder32, nnx.Param), nnx.state(encoder16, nnx.Param),
    )
    assert all(jax.tree.leaves(same)), "both encoders must hold the same weights"
    with jax.default_matmul_precision("float32"):  # a true float32 reference (no TF32 on GPU)
        reference = blocks_with_policy(encoder32, images)
    policy = blocks_with_policy(encoder16, images)
    old = blocks_all_bfloat16(encoder16, images)
    assert policy[0].dtype == jnp.float32 and old[0].dtype == jnp.bfloat16
    return (
        [relative_error(p, r) for p, r in zip(policy, reference, strict=True)],
        [relative_error(o, r) for o, r in zip(old, reference, strict=True)],
    )


# ------------------------------------------------------------------------------ demo-size run
DEMO_MODEL = dict(image_size=32, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)


def demo_optimizer(total_steps: int, warmup_steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup_steps, total_steps)
    decay = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.05, mask=decay)


@nnx.jit
def train_step(model, optimizer, images, key):
    def loss_fn(model):
        return model(images, rng=key)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def held_out_loss(model, images, noise):
    return model(images, noise=noise)[0]


DEMO_IMAGES = 2048  # generated 32 px images of the short training run


def demo_run(
    dtype, steps: int, batch: int, data: np.ndarray, held_out, seed: int, attention_impl: str
) -> dict:
    model = mae_jax.create_mae(
        "vit_micro_patch4", **DEMO_MODEL, dtype=dtype, attention_impl=attention_impl,
        rngs=make_rngs(seed),
    )
    optimizer = nnx.Optimizer(model, demo_optimizer(steps, max(1, steps // 12)), wrt=nnx.Param)
    order = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        if step % (len(data) // batch) == 0:
            permutation = order.permutation(len(data))
        start = (step % (len(data) // batch)) * batch
        images = jnp.asarray(data[permutation[start:start + batch]])
        losses.append(train_step(model, optimizer, images, jax.random.key(step)))
    losses = np.asarray(jax.device_get(losses), np.float64)
    own = float(held_out_loss(model, *held_out))
    # The bf16-trained weights evaluated in float32: drift of the weights, not of the forward.
    as_float32 = mae_jax.create_mae("vit_micro_patch4", **DEMO_MODEL, attention_impl="xla")
    nnx.update(as_float32, nnx.state(model, nnx.Param))
    with jax.default_matmul_precision("float32"):
        fp32_loss = float(held_out_loss(as_float32, *held_out))
    return {
        "first": float(losses[:25].mean()),
        "last": float(losses[-25:].mean()),
        "held_out": own,
        "held_out_fp32": fp32_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4, help="224 px images for the ViT-B table")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"),
                        help="ViT-B attention (auto: cuDNN on GPU in bf16, XLA elsewhere)")
    args = parser.parse_args()
    if min(args.images, args.train_steps, args.batch_size) < 1 or args.batch_size > DEMO_IMAGES:
        parser.error(f"--images and --train_steps must be >= 1, --batch_size in [1, "
                     f"{DEMO_IMAGES}] (the demo run's images)")  # QA: errors 32 s in
    print(f"jax {jax.__version__}, {jax.default_backend()} ({platform.processor() or 'cpu'}), "
          f"{jax.device_count()} device(s); {load_average()} at start")

    official = per_block_errors(args.images, args.seed, args.attention_impl, randomized=False)
    randomized = per_block_errors(args.images, args.seed, args.attention_impl, randomized=True)
    print(f"\n### ViT-B/16 encoder, 224 px, {args.images} generated images, attention "
          f"{args.attention_impl}: ||bf16 - fp32|| / ||fp32|| per output\n")
    print("| output | official init: bf16 policy | official init: all bf16 (previous) "
          "| randomized weights: bf16 policy | randomized weights: all bf16 (previous) |")
    print("|---|---|---|---|---|")
    names = [f"block {i}" for i in range(len(official[0]) - 1)] + ["final norm"]
    for i, name in enumerate(names):
        print(f"| {name} | {official[0][i]:.2e} | {official[1][i]:.2e} | "
              f"{randomized[0][i]:.2e} | {randomized[1][i]:.2e} |")
    print("\n(randomized: every parameter random as tests' torch_mae.randomize_, so that biases,"
          " LayerNorm affines and large block outputs are exercised)")

    data = generated_images(DEMO_IMAGES, 32, args.seed + 1)
    held_images = jnp.asarray(generated_images(256, 32, args.seed + 2))
    held_noise = jax.random.uniform(jax.random.key(args.seed + 3), (256, 64))
    results = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        # float32 in full: on a GPU JAX's default matmul precision is TF32, which would make
        # the gap below bf16 vs TF32. The bf16 run keeps the default (its products are bf16).
        precision = "float32" if dtype == jnp.float32 else None
        with jax.default_matmul_precision(precision):
            results[name] = demo_run(dtype, args.train_steps, args.batch_size, data,
                                     (held_images, held_noise), args.seed, args.attention_impl)
    print(f"\n### MAE loss after {args.train_steps} demo-size steps (vit_micro_patch4, 32 px, "
          f"batch {args.batch_size}), same init, data and masks\n")
    print("| compute | train loss, first 25 steps | train loss, last 25 steps | "
          "held-out loss (256 images) | held-out loss, weights run in fp32 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['first']:.4f} | {r['last']:.4f} | {r['held_out']:.4f} | "
              f"{r['held_out_fp32']:.4f} |")
    gap = results["bfloat16"]["held_out"] - results["float32"]["held_out"]
    print(f"\nheld-out loss gap bf16 - fp32: {gap:+.4f} "
          f"({gap / results['float32']['held_out']:+.2%}); {load_average()} at end")


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()
    main()
