"""Crops decoded on the host, resized and flipped (and RandAugment'd) on the accelerators.

`mae_jax.data.images.create_train_iterator(device_resize_canvas=C)` leaves the host only the
decoding: each example is its crop window (JPEG: only the window is decoded) padded into a
C x C canvas, with the crop's box and the flip (and, with RandAugment, its drawn layers). Here
one jitted function per batch runs PIL's bicubic resize + flip on the devices
(`mae_jax.data.pil_resample.resized_crop`: per-example weight matrices, static shapes), then the
layers (`mae_jax.data.randaugment_device`), and gives the images the host pipeline would have
made (to rounding). No TensorFlow here.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, PartitionSpec

from mae_jax.core import sharding as sharding_lib
from mae_jax.data.pil_resample import resized_crop
from mae_jax.data.randaugment_device import apply_layers

HOST_KEYS = ("canvas", "box", "flip")
RANDAUGMENT_KEYS = ("ra_code", "ra_args")


@functools.lru_cache(maxsize=16)
def make_canvas_fn(mesh: Mesh, *, image_size: int, randaugment: bool = False):
    """jitted (canvas uint8 [B, C, C, 3], box int32 [B, 4], flip bool [B], all batch-sharded)
    -> uint8 [B, S, S, 3] batch-sharded: the resize + flip the host left out
    (`mae_jax.data.images.create_train_iterator(device_resize_canvas=C)`). randaugment=True:
    two more arguments, ra_code int32 [B, L] and ra_args float32 [B, L, 6], whose RandAugment
    layers follow the resize (`mae_jax.data.randaugment_device`). Per device, no
    communication."""

    def local(canvas, box, flip, *program):
        images = resized_crop(canvas, box, flip, image_size)
        return apply_layers(images, *program) if program else images

    arity = len(HOST_KEYS) + (len(RANDAUGMENT_KEYS) if randaugment else 0)
    batch_spec = PartitionSpec(sharding_lib.BATCH_AXES)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(batch_spec,) * arity,
                           out_specs=batch_spec)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    return jax.jit(mapped, in_shardings=(batch_sharding,) * arity, out_shardings=batch_sharding)


class CanvasResizeIterator:
    """Wraps a host iterator of {"canvas", "box", "flip"} batches (`device_resize_canvas`):
    yields {"image": global jax.Array [B, S, S, 3]} sharded by `batch_sharding(mesh)`, resized
    and flipped on the devices; other entries ("label") pass through as numpy.
    `undecodable` is the host iterator's."""

    def __init__(self, batches, *, mesh: Mesh, image_size: int):
        self.batches = batches
        self.sharding = sharding_lib.batch_sharding(mesh)
        self.mesh, self.image_size = mesh, image_size

    @property
    def undecodable(self) -> set[str]:
        return self.batches.undecodable

    def __iter__(self) -> CanvasResizeIterator:
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.batches))
        randaugment = "ra_code" in batch
        keys = HOST_KEYS + (RANDAUGMENT_KEYS if randaugment else ())
        parts = sharding_lib.global_batch_from_host({key: batch.pop(key) for key in keys},
                                                    self.sharding)
        canvas_fn = make_canvas_fn(self.mesh, image_size=self.image_size,
                                   randaugment=randaugment)
        return {"image": canvas_fn(*(parts[key] for key in keys)), **batch}


def resize_on_devices(batches, *, canvas: int, mesh: Mesh, image_size: int,
                      randaugment: str = ""):
    """The train iterator of `create_train_iterator(device_resize_canvas=canvas)`: as it is
    when `canvas` is 0 (the host resized), else wrapped in CanvasResizeIterator, saying so
    (`randaugment`: the policy the iterator was made with, "" for none)."""
    if not canvas:
        return batches
    then = f", then RandAugment {randaugment}," if randaugment else ""
    print(f"Input: crop windows decoded on the host into {canvas} px canvases, resized{then} on "
          "the devices.")
    return CanvasResizeIterator(batches, mesh=mesh, image_size=image_size)
