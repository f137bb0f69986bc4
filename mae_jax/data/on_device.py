"""Input on the accelerators, for datasets that fit in device memory (CIFAR-size data).

The decoded dataset, uint8 [N, H, W, 3] (one image size), is copied once to every device
(replicated: N*H*W*3 bytes per device, 153.6 MB for CIFAR-100's 50,000 32x32 images). Each step
the host computes which examples the batch holds, int32 [B_local, 4] rows of (dataset index,
process, epoch, position) (and, for fine-tuning, their labels and RandAugment's draws); one
jitted function, run per device under shard_map (no communication), gathers the images and
applies torchvision's augmentation:

  RandomResizedCrop(S, scale (0.2, 1) for MAE pretraining, (0.08, 1) for the linear probe and
  fine-tuning, ratio (3/4, 4/3), bicubic) + RandomHorizontalFlip(0.5),

then, for fine-tuning, timm's RandAugment (its draws made on the host per batch in numpy,
`mae_jax.data.randaugment_draws`; its ops `mae_jax.data.randaugment_device`). The resize is
PIL's (`mae_jax.data.pil_resample`). Labels, when given, are looked up on the host.

Order and seeds follow `mae_jax.data.stream`'s scheme: process p holds examples p, p + P, ...;
epoch e visits them in a permutation drawn from (seed, p, e); the example at position i of epoch
e draws its crop and flip from fold_in(fold_in(fold_in(key(seed), p), e), i), and step k's
RandAugment layers come from numpy's generator seeded (seed, p, k). Batch k depends only on
(seed, p, k), so `start_step=k` resumes exactly. The examples differ from the tf.data
pipeline's for the same seed (other shuffle), but every example is seen once per epoch.
No TensorFlow here: this runs on machines without it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from mae_jax.core import sharding as sharding_lib
from mae_jax.data.constants import normalize_uint8
from mae_jax.data.pil_resample import center_resize, resized_crop
from mae_jax.data.randaugment_device import apply_layers
from mae_jax.data.randaugment_draws import draw_programs
from mae_jax.data.randaugment_policy import parse_rand_augment

CROP_SCALE = (0.2, 1.0)  # official MAE RandomResizedCrop scale
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10  # torchvision's attempts before its center-crop fallback
OUTPUT_DTYPES = ("uint8", "float32")
RANDAUGMENT_STREAM = 0x5241  # numpy seed prefix of the RandAugment draws ("RA")


# ------------------------------------------------------------------ Host: which examples


class ExampleSchedule:
    """Which examples step k holds on one process, as int32 [B_local, 4] rows of
    (dataset index, process, epoch, position in epoch). numpy only: no device work."""

    def __init__(self, num_examples: int, *, global_batch_size: int, seed: int,
                 process_index: int, process_count: int):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of the "
                f"{process_count} processes; change the batch size."
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0 for the on-device input, got {seed}.")
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.local_batch = global_batch_size // process_count
        self.num_local = num_examples // process_count  # equal shards: same steps everywhere
        self.steps_per_epoch = self.num_local // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the in-memory dataset gives {self.num_local} example(s) per process, fewer "
                f"than one local batch of {self.local_batch}; lower the batch size or use more "
                "data."
            )

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs alive at most (a boundary)
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices of this process in the order epoch `epoch` visits them: [num_local]."""
        rng = np.random.default_rng([self.seed, self.process_index, epoch])
        local = rng.permutation(self.num_local)
        return (self.process_index + self.process_count * local).astype(np.int32)

    def ids(self, step: int) -> np.ndarray:
        """int32 [B_local, 4]: (dataset index, process, epoch, position) of step `step`."""
        epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
        start = batch_in_epoch * self.local_batch
        positions = np.arange(start, start + self.local_batch, dtype=np.int32)
        ids = np.empty((self.local_batch, 4), np.int32)
        ids[:, 0] = self.epoch_order(epoch)[positions]
        ids[:, 1] = self.process_index
        ids[:, 2] = epoch
        ids[:, 3] = positions
        return ids


# ------------------------------------------------------------------ Device: augmentation


def crop_box(key: jax.Array, height: int, width: int, scale=CROP_SCALE,
             clipped: bool = False) -> jax.Array:
    """torchvision RandomResizedCrop.get_params with all tries drawn at once; clipped=True:
    MAE's util/crop.py (`mae_jax.data.image_ops.crop_box`).

    Returns int32 [4]: (top, left, crop_height, crop_width).
    """
    area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(area_key, (CROP_TRIES,), minval=scale[0],
                                               maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(ratio_key, (CROP_TRIES,), minval=math.log(CROP_RATIO[0]),
                                        maxval=math.log(CROP_RATIO[1])))
    # jnp.round and Python's round (torchvision) both round half to even.
    crop_w = jnp.round(jnp.sqrt(area * aspect))
    crop_h = jnp.round(jnp.sqrt(area / aspect))
    if clipped:  # then every try fits and the first is taken
        crop_w, crop_h = jnp.clip(crop_w, 1, width), jnp.clip(crop_h, 1, height)
    valid = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    # torch.randint(0, n + 1) as floor(u * (n + 1)); the clamp guards float32 rounding of u ~ 1.
    top_u, left_u = (jax.random.uniform(k, (CROP_TRIES,)) for k in (top_key, left_key))
    top = jnp.minimum(jnp.floor(top_u * (height - crop_h + 1)), height - crop_h)
    left = jnp.minimum(jnp.floor(left_u * (width - crop_w + 1)), width - crop_w)
    first = jnp.argmax(valid)
    chosen = jnp.stack([top[first], left[first], crop_h[first], crop_w[first]])
    # No try fits: the central crop with the aspect ratio clamped to CROP_RATIO (static).
    fallback_w, fallback_h = width, height
    if width / height < CROP_RATIO[0]:
        fallback_h = int(round(width / CROP_RATIO[0]))
    elif width / height > CROP_RATIO[1]:
        fallback_w = int(round(height * CROP_RATIO[1]))
    fallback = jnp.array([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h,
                          fallback_w], jnp.float32)
    return jnp.where(jnp.any(valid), chosen, fallback).astype(jnp.int32)


def example_key(seed: int, ids: jax.Array) -> jax.Array:
    """ids: int32 [4] (index, process, epoch, position) -> the example's key."""
    key = jax.random.fold_in(jax.random.key(seed), ids[1])
    return jax.random.fold_in(jax.random.fold_in(key, ids[2]), ids[3])


def random_params(keys: jax.Array, height: int, width: int, scale=CROP_SCALE,
                  clipped: bool = False) -> tuple[jax.Array, jax.Array]:
    """keys: [B] -> (crop boxes int32 [B, 4] (top, left, height, width), flips bool [B]);
    `scale`: RandomResizedCrop's area range; clipped: `crop_box`'s."""
    crop_keys, flip_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    boxes = jax.vmap(lambda key: crop_box(key, height, width, scale, clipped))(crop_keys)
    return boxes, jax.vmap(jax.random.uniform)(flip_keys) < 0.5  # RandomHorizontalFlip(0.5)


@functools.lru_cache(maxsize=16)  # a resumed or repeated iterator reuses the compiled function
def make_batch_fn(mesh: Mesh, *, seed: int, image_size: int, augment: bool = True,
                  dtype: str = "uint8", crop_scale: tuple[float, float] = CROP_SCALE,
                  randaugment: bool = False, crop_clipped: bool = False):
    """jitted (dataset [N, H, W, 3] replicated, ids int32 [B, 4] batch-sharded) -> images
    [B, S, S, 3] batch-sharded: uint8, or ImageNet-normalised float32 of the same uint8 values.
    randaugment=True: two more batch-sharded arguments, ra_code int32 [B, L] and ra_args
    float32 [B, L, 6] (`mae_jax.data.randaugment_draws`), whose layers follow the crop and flip.
    Each device works on its own rows (shard_map): no communication."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}.")

    def local(dataset, ids, *program):
        images = jnp.take(dataset, ids[:, 0], axis=0)
        if augment:
            keys = jax.vmap(lambda row: example_key(seed, row))(ids)
            boxes, flips = random_params(keys, *dataset.shape[1:3], crop_scale, crop_clipped)
            images = resized_crop(images, boxes, flips, image_size)
        else:
            images = center_resize(images, image_size)
        if program:
            images = apply_layers(images, *program)
        return images if dtype == "uint8" else normalize_uint8(images)

    batch_spec = PartitionSpec(sharding_lib.BATCH_AXES)
    batch_args = 3 if randaugment else 1
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(),) + (batch_spec,) *
                           batch_args, out_specs=batch_spec)
    # Explicit out_shardings: shard_map alone reports P('data') when fsdp == 1, an equivalent
    # sharding the train step's jit cache would see as new (one more compile).
    batch_sharding = sharding_lib.batch_sharding(mesh)
    return jax.jit(mapped, in_shardings=(sharding_lib.replicated(mesh),) + (batch_sharding,) *
                   batch_args, out_shardings=batch_sharding)


# ------------------------------------------------------------------ The iterator


def check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise ValueError(
            f"on-device input needs a uint8 numpy array [N, H, W, 3] of decoded images, got "
            f"{type(images).__name__} {shape} {getattr(images, 'dtype', '')}; load it with "
            "mae_jax.data.in_memory.load_image_array."
        )


class OnDeviceIterator:
    """Infinite iterator of {"image": global jax.Array [global_batch_size, S, S, 3]} sharded by
    `batch_sharding(mesh)`; the training loop takes these batches unchanged.

    images: the whole dataset, uint8 [N, H, W, 3], the same on every process (each process
    uses its shard p, p + P, ...). dtype "uint8" (normalise in the step) or "float32"
    (ImageNet-normalised here, what a step without normalisation expects). crop_scale:
    RandomResizedCrop's area range (MAE pretraining's (0.2, 1); torchvision's default
    (0.08, 1) for the linear probe and fine-tuning); crop_clipped: the linear probe's boxes
    (`crop_box`).

    For classification: labels, int [N], adds "label" (this process's int32 [B_local], numpy;
    the loop makes it global); randaugment, a timm string such as "rand-m9-mstd0.5-inc1", adds
    RandAugment after the crop and flip (timm's order), its draws made on the host per batch
    (`mae_jax.data.randaugment_draws`, numpy's generator keyed by (seed, process, step)) and its
    ops run on the devices (`mae_jax.data.randaugment_device`).
    """

    def __init__(self, images: np.ndarray, *, mesh: Mesh, image_size: int,
                 global_batch_size: int, seed: int, start_step: int = 0, augment: bool = True,
                 dtype: str = "uint8", labels: np.ndarray | None = None,
                 crop_scale: tuple[float, float] = CROP_SCALE, randaugment: str = "",
                 crop_clipped: bool = False):
        check_images(images)
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}.")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got "
                             f"{tuple(crop_scale)}.")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
                raise ValueError(f"labels must be integers [{len(images)}], one per image, got "
                                 f"{labels.dtype} {labels.shape}.")
            self.labels = labels.astype(np.int32)
        else:
            self.labels = None
        if randaugment and not augment:
            raise ValueError("randaugment needs augment=True (it follows the random crop).")
        self.randaugment = parse_rand_augment(randaugment) if randaugment else None
        self.schedule = ExampleSchedule(
            len(images), global_batch_size=global_batch_size, seed=seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        self.ids_sharding = sharding_lib.batch_sharding(mesh)
        local_devices = len(self.ids_sharding.addressable_devices)
        if self.schedule.local_batch % local_devices:
            raise ValueError(
                f"the per-process batch {self.schedule.local_batch} must be a multiple of the "
                f"{local_devices} local devices; change the batch size."
            )
        # make_array_from_callback: each process fills its own devices (works multi-host).
        self.dataset = jax.make_array_from_callback(
            images.shape, sharding_lib.replicated(mesh), lambda index: images[index]
        )
        self.dataset_bytes_per_device = images.nbytes
        self.batch_fn = make_batch_fn(mesh, seed=seed, image_size=image_size, augment=augment,
                                      dtype=dtype, crop_scale=tuple(crop_scale),
                                      randaugment=self.randaugment is not None,
                                      crop_clipped=crop_clipped)
        self.image_size, self.step = image_size, start_step

    def __iter__(self) -> OnDeviceIterator:
        return self

    def host_part(self, step: int, schedule: ExampleSchedule | None = None
                  ) -> dict[str, np.ndarray]:
        """All the host computes for step `step` of this process (or of `schedule`'s): "ids"
        and, with RandAugment, its draws "ra_code" and "ra_args"."""
        schedule = schedule or self.schedule
        host = {"ids": schedule.ids(step)}
        if self.randaugment is not None:
            rng = np.random.default_rng([RANDAUGMENT_STREAM, schedule.seed,
                                         schedule.process_index, step])
            host.update(draw_programs(rng, schedule.local_batch, self.image_size,
                                      **self.randaugment))
        return host

    def __next__(self) -> dict[str, jax.Array]:
        host = self.host_part(self.step)
        args = sharding_lib.global_batch_from_host(host, self.ids_sharding)
        self.step += 1
        batch = {"image": self.batch_fn(self.dataset, *args.values())}  # not waited for
        if self.labels is not None:
            batch["label"] = self.labels[host["ids"][:, 0]]
        return batch
