"""RandAugment on the accelerators (mae_jax.data.randaugment_device, randaugment_program)
against PIL as timm 0.3.2 calls it, and against the host pipeline's images.

References: each op against the PIL call timm makes (tests/test_randaugment.py's `timm_op`,
PIL's own code); whole programs against timm's ops replayed with PIL for the same draws; the
fine-tuning pipeline with the device path against the host path (itself pinned to PIL).
Tolerances: float32 where PIL computes in float64 (warp coordinates and cubic): values within
one level, and a handful of samples lying on the image border may take the fill colour in one
and not the other (`assert_close`). The integer ops, AutoContrast and the blends are exact.
"""

import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_randaugment import FILL, _scene, timm_level_to_arg, timm_op

from mae_jax.core import sharding as sharding_lib
from mae_jax.data import randaugment as ra
from mae_jax.data import randaugment_device as device
from mae_jax.data import randaugment_program as program

SIZE = 40
IMAGE = _scene(SIZE, SIZE, 4)
CASES = [(name, level, negate)
         for name in sorted(set(ra.RAND_OPS) | set(ra.RAND_INCREASING_OPS))
         for level, negate in ((7.3, False), (2.15, True), (10.0, False))]
EXACT = {"AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize",
         "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast",
         "ContrastIncreasing", "Brightness", "BrightnessIncreasing", "Sharpness",
         "SharpnessIncreasing"}


@pytest.fixture(scope="module")
def mesh():
    return sharding_lib.create_mesh(data=-1, fsdp=1)


def assert_close(ours, ref):
    """At most 1% of the values a level off, 0.5% more (fill-colour flips on the border)."""
    diff = np.abs(np.asarray(ours).astype(int) - np.asarray(ref).astype(int))
    assert (diff > 1).mean() <= 5e-3, f"{np.count_nonzero(diff > 1)} values differ by > 1"
    assert (diff == 1).mean() <= 1e-2, f"{np.count_nonzero(diff == 1)} values differ by 1"


_apply_layers = jax.jit(device.apply_layers, static_argnames="slots")


def _apply(images, codes, args, slots=None):
    return np.asarray(_apply_layers(np.asarray(images), np.asarray(codes),
                                    np.asarray(args, np.float32), FILL, slots=slots))


def test_each_op_on_the_device_matches_timms_pil_call():
    """All 21 timm ops (both lists) at three levels, one layer each, in one device call."""
    codes, args = zip(*(program._encode(name, SIZE, tf.constant(level, tf.float64),
                                        tf.constant(negate), 0.45)
                        for name, level, negate in CASES), strict=True)
    ours = _apply(np.stack([IMAGE] * len(CASES)), np.asarray(codes)[:, None],
                  np.stack([a.numpy() for a in args])[:, None], slots=len(CASES))
    unchanged = 0
    for out, (name, level, negate) in zip(ours, CASES, strict=True):
        ref = timm_op(IMAGE, name, timm_level_to_arg(name, level, negate, SIZE, SIZE))
        unchanged += np.array_equal(ref, IMAGE)  # e.g. Solarize at level 10 (threshold 256)
        if name in EXACT:
            np.testing.assert_array_equal(out, ref, err_msg=name)
        else:
            assert_close(out, ref)
    assert unchanged <= 3


def test_identity_layers_leave_every_pixel_as_it_is():
    images = np.stack([_scene(SIZE, SIZE, seed) for seed in range(3)])
    identity = program.identity_program(3)
    codes = np.broadcast_to(identity["ra_code"].numpy(), (3, 3))
    args = np.broadcast_to(identity["ra_args"].numpy(), (3, 3, device.NUM_ARGS))
    np.testing.assert_array_equal(_apply(images, codes, args), images)
    zeros = np.zeros((3, 3, device.NUM_ARGS), np.float32)  # skipped layers: any arguments
    np.testing.assert_array_equal(_apply(images, codes, zeros), images)


def test_programs_replay_the_host_draws_as_timms_ops_would():
    """layer_program(seed) on the device == timm's ops replayed with PIL for the draws
    `sample_layers(seed)` makes (the host path's `rand_augment(image, seed)` draws)."""
    names = ra.op_names(increasing=True)
    seeds = [tf.constant([s, 23]) for s in range(48)]
    programs = [program.layer_program(seed, SIZE) for seed in seeds]
    ours = _apply(np.stack([IMAGE] * len(seeds)), [p["ra_code"].numpy() for p in programs],
                  [p["ra_args"].numpy() for p in programs])
    seen = set()
    for out, seed in zip(ours, seeds, strict=True):
        draws = {k: v.numpy() for k, v in ra.sample_layers(seed, num_ops=15).items()}
        ref = IMAGE
        for op, applied, level, negate in zip(draws["op_index"], draws["apply"],
                                              draws["magnitude"], draws["negate"], strict=True):
            if applied:
                seen.add(names[op])
                ref = timm_op(ref, names[op], timm_level_to_arg(names[op], level, negate,
                                                                SIZE, SIZE))
        assert_close(out, ref)
    assert len(seen) >= 12  # most ops hit, in both layers


def test_stages_on_gathered_images_equal_the_whole_batch_and_overflow_skips_the_layer():
    """apply_layers computes each stage on the images that picked it, gathered into slots: the
    same bits as computing it on every image while they fit; an image past the slots keeps
    that layer unapplied (with the default slots, probability < 1e-9 a stage)."""
    images = np.stack([_scene(SIZE, SIZE, seed) for seed in range(16)])
    programs = [program.layer_program(tf.constant([s, 2]), SIZE) for s in range(16)]
    codes = np.stack([p["ra_code"].numpy() for p in programs])
    args = np.stack([p["ra_args"].numpy() for p in programs])
    whole = _apply(images, codes, args, slots=16)
    assert (codes != device.CODE["identity"]).sum() >= 12
    assert max(device.stage_slots(16, share) for _, share in device.STAGES.values()) < 16
    np.testing.assert_array_equal(_apply(images, codes, args), whole)  # default slots
    # One slot a stage: per layer and stage, only the first image (in batch order) that picked
    # it is augmented; the same as the whole-batch result with the other picks skipped.
    skipped = codes.copy()
    for layer in range(codes.shape[1]):
        picks = device.stage_picks(codes[:, layer], args[:, layer])
        assert sum(np.asarray(p, int) for p in picks.values()).max() <= 1  # one stage each
        for picked in picks.values():
            skipped[np.flatnonzero(picked)[1:], layer] = device.CODE["identity"]
    assert (skipped != codes).sum() >= 4
    np.testing.assert_array_equal(_apply(images, codes, args, slots=1),
                                  _apply(images, skipped, args, slots=16))
    # The slot counts: the binomial bound, e.g. 31 of 64 images for the warp.
    assert device.stage_slots(64, 5 / 30) == 31 and device.stage_slots(2, 5 / 30) == 2


def test_shears_and_translations_go_to_the_shift_stage_rotations_to_the_warp():
    """stage_picks on the host path's encoding: ShearX / ShearY / TranslateXRel /
    TranslateYRel to `shift` (4 taps; its bits against the warp's in
    tests/test_randaugment_device_ops.py), Rotate to the 16-tap warp."""
    names = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Rotate")
    codes, args = zip(*(program._encode(name, 40, tf.constant(7.0, tf.float64),
                                        tf.constant(False), 0.45) for name in names),
                      strict=True)
    picks = device.stage_picks(np.asarray(codes), np.stack([a.numpy() for a in args]))
    assert np.asarray(picks["shift"]).tolist() == [True] * 4 + [False]
    assert np.asarray(picks["warp"]).tolist() == [False] * 4 + [True]


def test_bad_program_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"codes \[B, L\] and args \[B, L, 6\]"):
        device.apply_layers(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2), np.int32),
                            np.zeros((2, 2, 3), np.float32))


def test_finetune_pipeline_with_randaugment_on_the_devices_gives_the_host_images(mesh,
                                                                                tmp_path):
    """create_train_iterator(randaugment=..., device_resize_canvas=C) + CanvasResizeIterator
    == the host pipeline (crop, resize, flip and RandAugment on the host) image for image, to
    rounding: the same draws, an undecodable file replaced the same way, resumable."""
    from mae_jax.data import device_resize, images

    rng = np.random.default_rng(9)
    for index, (height, width) in enumerate([(30, 44), (52, 40), (70, 90), (44, 44)]):
        pixels = _scene(height, width, index)
        Image.fromarray(pixels).save(tmp_path / f"{index}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (36, 50, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    common = dict(source=f"folder:{tmp_path}", image_size=24, global_batch_size=4, seed=3,
                  process_index=0, process_count=1, randaugment="rand-m9-mstd0.5-inc1",
                  crop_scale=(0.2, 1.0))
    host = images.create_train_iterator(**common)
    host = np.stack([next(host)["image"] for _ in range(5)])
    on_devices = device_resize.CanvasResizeIterator(
        images.create_train_iterator(device_resize_canvas=64, **common), mesh=mesh,
        image_size=24)
    ours = np.stack([np.asarray(next(on_devices)["image"]) for _ in range(5)])
    assert_close(ours, host)
    assert {os.path.basename(name) for name in on_devices.undecodable} == {"broken.jpg"}
    resumed = device_resize.CanvasResizeIterator(
        images.create_train_iterator(device_resize_canvas=64, start_step=3, **common),
        mesh=mesh, image_size=24)
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), ours[3])
