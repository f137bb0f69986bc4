"""mae_jax.data.on_device (torchvision's RandomResizedCrop + flip with PIL's bicubic, run on the
devices; the resumable example order) and mae_jax.data.in_memory (the dataset as one array)."""

import json
import math
import os
import random
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import FAST_COMPILE
from PIL import Image

from mae_jax.core import sharding as sharding_lib
from mae_jax.core.errors import BadDataError
from mae_jax.data import device_resize, in_memory, on_device, pil_resample, tf_runtime
from mae_jax.data.generated import generate_image

MESH_DEVICES = 4  # tests/conftest.py simulates 4 CPU devices
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------- References written out


def torchvision_get_params(rng: random.Random, height, width, scale=(0.2, 1.0),
                           ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, with Python's RNG for torch's."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pil_resize_classic(image: Image.Image, width: int, height: int) -> Image.Image:
    """PIL's bicubic resize in its classic order (Pillow <= 12, what the official MAE ran):
    the horizontal pass (rounded to uint8), then the vertical one, each one PIL call. Pillow 13
    runs the vertical pass first in some downscales (python-pillow/Pillow#9549)."""
    return image.resize((width, image.height), Image.BICUBIC).resize((width, height),
                                                                     Image.BICUBIC)


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic (max CDF distance)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    points = np.union1d(a, b)
    return np.max(np.abs(np.searchsorted(a, points, "right") / len(a)
                         - np.searchsorted(b, points, "right") / len(b)))


def our_params(count, height, width, seed=0):
    keys = jax.random.split(jax.random.key(seed), count)
    boxes, flips = jax.jit(on_device.random_params, static_argnums=(1, 2))(keys, height, width)
    return np.asarray(boxes), np.asarray(flips)


# ----------------------------------------------------------------- Crop boxes and flips


@pytest.mark.parametrize("height,width", [(32, 32), (20, 45)])
def test_crop_boxes_follow_torchvision_get_params_distribution(height, width):
    # (20, 45) is wider than 4/3: many tries fail, so "first valid try" and the fallback count.
    count = 20_000
    ours, _ = our_params(count, height, width)
    rng = random.Random(0)
    theirs = np.array([torchvision_get_params(rng, height, width) for _ in range(count)])
    for column, name in enumerate(("top", "left", "height", "width")):
        assert ks_statistic(ours[:, column], theirs[:, column]) < 0.02, name
    assert ks_statistic(ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3]) < 0.02
    # Log-uniform aspect ratios (a uniform ratio would shift this mean by ~0.03).
    log_aspect = [np.log(b[:, 3] / b[:, 2]).mean() for b in (ours, theirs)]
    assert abs(log_aspect[0] - log_aspect[1]) < 0.006
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()


def test_no_try_fits_gives_torchvision_center_fallback():
    # 4 x 200: every try is taller than 4 px, so torchvision's fallback (ratio clamped to 4/3).
    ours, _ = our_params(64, 4, 200)
    expected = torchvision_get_params(random.Random(0), 4, 200)
    assert expected == (0, 97, 4, 5)
    assert (ours == np.array(expected)).all()


def test_flip_probability_is_one_half():
    _, flips = our_params(4000, 32, 32, seed=1)
    assert abs(flips.mean() - 0.5) < 0.03  # 4 standard deviations


# ----------------------------------------------------------------- Resampling against PIL


def _crops(rng, count, height, width):
    boxes = []
    for _ in range(count):
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        boxes.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
    return np.array(boxes, np.int32), rng.random(count) < 0.5


def _ours(images, boxes, flips, size):
    fn = jax.jit(pil_resample.resized_crop, static_argnums=3)
    return np.asarray(fn(images, boxes, flips, size)).astype(int)


def _pil(image, box, flip, size, resize):
    top, left, h, w = (int(v) for v in box)
    out = resize(Image.fromarray(image).crop((left, top, left + w, top + h)), size, size)
    return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out).astype(int)


def test_upscaled_crops_equal_one_pil_bicubic_resize():
    # The seed run's case: crops of 32x32 images enlarged (any Pillow: horizontal pass first).
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)  # worst case: max overshoot
    scenes = np.stack([generate_image(rng, 32) for _ in range(24)])
    images = np.concatenate([noise, scenes])
    boxes, flips = _crops(rng, len(images), 32, 32)
    ours = _ours(images, boxes, flips, 64)
    theirs = np.stack([_pil(images[i], boxes[i], flips[i], 64,
                            lambda im, w, h: im.resize((w, h), Image.BICUBIC))
                       for i in range(len(images))])
    # PIL's 22-bit fixed-point weights vs float32: only sums within ~1e-4 of a .5 boundary can
    # round the other way, by one level.
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


def test_downscaled_crops_equal_pil_bicubic_with_antialiasing():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (32, 48, 40, 3), dtype=np.uint8)
    boxes, flips = _crops(rng, len(images), 48, 40)
    ours = _ours(images, boxes, flips, 12)
    theirs = np.stack([_pil(images[i], boxes[i], flips[i], 12, pil_resize_classic)
                       for i in range(len(images))])
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


@pytest.mark.parametrize("height,width,size", [(24, 40, 16), (12, 20, 16), (30, 18, 18)])
def test_center_path_equals_torchvision_resize_and_center_crop(height, width, size):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8)
    ours = np.asarray(jax.jit(pil_resample.center_resize, static_argnums=1)(images, size))
    for image, out in zip(images, ours, strict=True):
        # torchvision Resize(size): shorter side = size, longer = int(size * long / short).
        new_w, new_h = ((size, int(size * height / width)) if width <= height
                        else (int(size * width / height), size))
        resized = pil_resize_classic(Image.fromarray(image), new_w, new_h)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        expected = np.asarray(resized.crop((left, top, left + size, top + size))).astype(int)
        assert np.abs(out.astype(int) - expected).max() <= 1


# ----------------------------------------------------------------- Order, resume, sharding


def test_each_epoch_visits_every_example_of_every_process_once():
    # 26 examples, 2 processes of 13, local batch 4: 3 steps per epoch, one example left out.
    schedules = [on_device.ExampleSchedule(26, global_batch_size=8, seed=5, process_index=p,
                                           process_count=2) for p in range(2)]
    assert schedules[0].steps_per_epoch == 3
    for epoch in range(3):
        seen = []
        for schedule in schedules:
            steps = [schedule.ids(epoch * 3 + k) for k in range(3)]
            ids = np.concatenate(steps)
            assert (ids[:, 1] == schedule.process_index).all() and (ids[:, 2] == epoch).all()
            np.testing.assert_array_equal(ids[:, 3], np.arange(12))
            order = schedule.epoch_order(epoch)
            assert sorted(order) == list(range(schedule.process_index, 26, 2))  # its shard
            seen.extend(ids[:, 0])
        assert len(set(seen)) == len(seen) == 24  # no example twice in an epoch
    orders = [tuple(schedules[0].epoch_order(e)) for e in range(3)]
    assert len(set(orders)) == 3  # a new permutation each epoch


@pytest.fixture(scope="module")
def mesh():
    return sharding_lib.create_mesh(data=-1, fsdp=1)


def _take(iterator, count):
    return [np.asarray(next(iterator)["image"]) for _ in range(count)]


def test_iterator_resumes_exactly_and_depends_on_the_seed(mesh):
    images = np.random.default_rng(3).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    common = dict(mesh=mesh, image_size=12, global_batch_size=8)  # 3 steps per epoch
    fresh = _take(on_device.OnDeviceIterator(images, seed=1, **common), 6)
    resumed = _take(on_device.OnDeviceIterator(images, seed=1, start_step=4, **common), 2)
    for a, b in zip(fresh[4:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    other = _take(on_device.OnDeviceIterator(images, seed=2, **common), 1)
    assert not np.array_equal(fresh[0], other[0])
    assert not np.array_equal(fresh[0], fresh[3])  # epoch 2 is not a replay of epoch 1


def test_batches_are_sharded_over_the_mesh_and_pass_through_the_loop(mesh):
    # Constant images keep their value through crop + resize: the value names the example.
    values = 10 * np.arange(24, dtype=np.uint8) + 5
    images = np.broadcast_to(values[:, None, None, None], (24, 8, 8, 3)).copy()
    iterator = on_device.OnDeviceIterator(images, mesh=mesh, image_size=12, global_batch_size=8,
                                          seed=1)
    assert iterator.dataset_bytes_per_device == images.nbytes
    batch_sharding = sharding_lib.batch_sharding(mesh)
    seen = []
    for _ in range(3):  # one epoch
        batch = next(iterator)
        image = batch["image"]
        assert image.shape == (8, 12, 12, 3) and image.dtype == np.uint8
        # Equal, not only equivalent: the compiled train step must not see a new sharding.
        assert image.sharding == batch_sharding
        assert {s.data.shape for s in image.addressable_shards} == {(8 // MESH_DEVICES, 12, 12, 3)}
        assert len(image.addressable_shards) == MESH_DEVICES
        # The loop's host-batch step leaves device batches as they are.
        assert sharding_lib.global_batch_from_host(batch, batch_sharding)["image"] is image
        host = np.asarray(image)
        assert (host == host[:, :1, :1, :1]).all()
        seen.extend(host[:, 0, 0, 0])
    assert sorted(seen) == sorted(values)


def test_global_batch_from_host_rejects_device_arrays_sharded_otherwise(mesh):
    replicated = jax.device_put(np.zeros((8, 3), np.float32), sharding_lib.replicated(mesh))
    with pytest.raises(ValueError, match="not as the batch sharding"):
        sharding_lib.global_batch_from_host({"image": replicated},
                                            sharding_lib.batch_sharding(mesh))


def test_batches_do_not_depend_on_the_mesh_and_float_output_is_normalised_uint8(mesh):
    images = np.random.default_rng(4).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    common = dict(image_size=12, global_batch_size=8, seed=1)  # as above: compiled already
    one_device = sharding_lib.create_mesh(devices=jax.devices()[:1])
    on_four = _take(on_device.OnDeviceIterator(images, mesh=mesh, **common), 2)
    on_one = _take(on_device.OnDeviceIterator(images, mesh=one_device, **common), 2)
    for a, b in zip(on_four, on_one, strict=True):
        np.testing.assert_array_equal(a, b)
    floats = _take(on_device.OnDeviceIterator(images, mesh=mesh, dtype="float32", **common), 1)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(floats[0], (on_four[0] / 255 - mean) / std, atol=1e-5)


def test_bad_inputs_fail_with_the_fix_named(mesh):
    images = np.zeros((16, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8 numpy array"):
        on_device.OnDeviceIterator(images.astype(np.float32), mesh=mesh, image_size=8,
                                   global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="multiple of the 4 local devices"):
        on_device.OnDeviceIterator(images, mesh=mesh, image_size=8, global_batch_size=6, seed=0)
    with pytest.raises(ValueError, match="fewer than one local batch"):
        on_device.OnDeviceIterator(images, mesh=mesh, image_size=8, global_batch_size=32, seed=0)


# ------------------------------------------------ Host-decoded crops resized on the devices


def test_resize_on_device_gives_the_host_pipelines_images_and_resumes(mesh, tmp_path, caplog):
    """create_train_iterator(device_resize_canvas=C) + CanvasResizeIterator == the host-resize
    pipeline, batch for batch, to rounding (the two sum the same products in other orders; a
    sum at a .5 tie may round the other way): JPEG windows (MCU edge columns included) and
    PNGs padded into the canvas, windows larger than it resized on the host, an undecodable
    file replaced the same way; resumed at a step, the same batches."""
    from mae_jax.data import images

    rng = np.random.default_rng(5)
    for index, (height, width) in enumerate([(30, 44), (52, 40), (70, 90), (25, 61), (44, 44)]):
        ramp = np.linspace(0, 255, width)[None, :, None]
        pixels = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{index}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (36, 50, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    common = dict(source=f"folder:{tmp_path}", image_size=16, global_batch_size=4, seed=2,
                  process_index=0, process_count=1)
    host = _take(images.create_train_iterator(**common), 6)
    windows = images.create_train_iterator(device_resize_canvas=48, **common)
    boxes = np.concatenate([next(windows)["box"] for _ in range(6)])
    resized_on_host = (boxes == [0, 0, 16, 16]).all(axis=1)
    assert 0 < resized_on_host.sum() < len(boxes)  # both paths taken
    device = device_resize.CanvasResizeIterator(
        images.create_train_iterator(device_resize_canvas=48, **common), mesh=mesh,
        image_size=16)
    batches = [next(device)["image"] for _ in range(6)]
    assert batches[0].sharding.is_equivalent_to(sharding_lib.batch_sharding(mesh), 4)
    batches = [np.asarray(batch) for batch in batches]
    difference = np.abs(np.stack(host).astype(int) - np.stack(batches))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.005
    assert {os.path.basename(name) for name in device.undecodable} == {"broken.jpg"}
    resumed = device_resize.CanvasResizeIterator(
        images.create_train_iterator(device_resize_canvas=48, start_step=4, **common),
        mesh=mesh, image_size=16)
    for a, b in zip(batches[4:], _take(resumed, 2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="device_resize_canvas 8 must be 0"):
        images.create_train_iterator(device_resize_canvas=8, **common)
    with pytest.raises(ValueError, match="center_crop runs on the host"):
        images.create_train_iterator(device_resize_canvas=48, center_crop=True, **common)


# ----------------------------------------------------------------- The dataset as one array


def _folder(root, sizes):
    rng = np.random.default_rng(0)
    arrays = []
    for index, (height, width) in enumerate(sizes):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / f"{index:03d}.png")
        arrays.append(array)
    return f"folder:{root}", arrays


def test_folder_loads_into_one_array_in_file_order(tmp_path):
    source, arrays = _folder(tmp_path, [(6, 10)] * 5)
    assert in_memory.fixed_image_shape(source=source) == (5, 6, 10, 3)
    loaded = in_memory.load_image_array(source=source)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, np.stack(arrays))  # PNG: lossless


def test_labelled_folder_loads_each_image_with_its_label_and_leaves_out_undecodable(tmp_path):
    """The fine-tuning input's load: class folders in sorted order; a truncated file is left
    out with its label, the others keep theirs."""
    for label, name in enumerate(("cat", "dog")):
        os.makedirs(tmp_path / "train" / name)
        for index in range(3):
            value = np.full((4, 4, 3), 100 * label + 10 * index, np.uint8)
            Image.fromarray(value).save(tmp_path / "train" / name / f"{index}.png")
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    images, labels = in_memory.load_image_array(source=f"folder:{tmp_path}", split="train",
                                                with_labels=True)
    assert labels.dtype == np.int32 and labels.tolist() == [0, 0, 1, 1, 1]
    assert images[:, 0, 0, 0].tolist() == [0, 20, 100, 110, 120]


def test_folder_of_mixed_sizes_is_refused_for_always_and_skipped_for_auto(tmp_path):
    source, _ = _folder(tmp_path, [(6, 10), (6, 10), (7, 10)])
    assert in_memory.fixed_image_shape(source=source) is None
    # Bad input, one message and exit status 2 (QA: a traceback came first).
    with pytest.raises(BadDataError, match="different sizes"):
        in_memory.load_image_array(source=source)
    cpu = jax.devices()
    assert in_memory.use_on_device("auto", source=source, devices=cpu) is False
    with pytest.raises(BadDataError, match="images of one size"):
        in_memory.use_on_device("always", source=source, devices=cpu)


def test_tfds_split_loads_with_its_fixed_feature_shape():
    with tfds.testing.mock_data(num_examples=12):
        shape = in_memory.fixed_image_shape(source="tfds:cifar100")
        loaded = in_memory.load_image_array(source="tfds:cifar100")
    assert shape == (12, 32, 32, 3) and loaded.shape == shape and loaded.dtype == np.uint8
    assert loaded.std() > 10  # decoded content, not zeros
    # no_tfds_scratch: the empty folder TFDS makes for a builder of an unprepared dataset.
    with tfds.testing.mock_data(num_examples=12), tf_runtime.no_tfds_scratch():
        images, labels = in_memory.load_image_array(source="tfds:cifar100", with_labels=True)
        want = [(example["image"], example["label"]) for example in
                tfds.as_numpy(tfds.load("cifar100", split="train", shuffle_files=False))]
    np.testing.assert_array_equal(images, np.stack([image for image, _ in want]))
    assert labels.tolist() == [int(label) for _, label in want]
    assert len(set(labels.tolist())) > 1


def test_on_device_choice_follows_mode_platform_and_memory(tmp_path):
    source, _ = _folder(tmp_path, [(6, 10)] * 4)  # 720 bytes decoded

    def fake(platform, limit, process_index=0):
        return types.SimpleNamespace(platform=platform, process_index=process_index,
                                     memory_stats=lambda: {"bytes_limit": limit})

    def remote():  # another host's device: it cannot be asked (every host decides alike)
        def refuse():
            raise RuntimeError("memory_stats of a non-addressable device")
        return types.SimpleNamespace(platform="gpu", process_index=1, memory_stats=refuse)

    def choose(mode, *devices):
        return in_memory.use_on_device(mode, source=source, devices=devices)

    cpu = jax.devices()[0]
    assert choose("never", fake("gpu", 10**9)) is False
    assert choose("auto", cpu) is False  # CPU: tf.data stays
    assert choose("always", cpu) is True
    assert choose("auto", fake("gpu", 10**9)) is True
    assert choose("auto", fake("gpu", 10**9), fake("gpu", 2000)) is False  # > 25% of 2000
    assert choose("auto", fake("gpu", 10**9), remote()) is True
    with pytest.raises(ValueError, match="GiB per device"):
        choose("always", fake("gpu", 2000))
    with pytest.raises(ValueError, match="one of"):
        choose("yes", cpu)


# ----------------------------------------------------------------- Without TensorFlow, benchmark


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_benchmark_runs_without_tensorflow_and_reports_both_inputs(tmp_path, task):
    # The GPU machine has no TensorFlow: a package named tensorflow that fails to import
    # shadows the real one, so the benchmark (the step, on_device, sharding) must not need it.
    # finetune: the fine-tuning step and the input with labels and RandAugment.
    fake = tmp_path / "no_tf" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no TensorFlow (simulated)')\n")
    out_json = tmp_path / "bench.json"
    args = ["--image_size", "16", "--patch_size", "8", "--embed_dim", "16", "--depth", "1",
            "--num_heads", "1", "--decoder_depth", "1", "--decoder_width", "32",
            "--batch_size", "4", "--num_images", "64", "--steps", "1", "--repeats", "2",
            "--warmup", "0", "--task", task, "--out_json", str(out_json)]
    # Unoptimised XLA code compiles ~3x faster; this checks the wiring, not the speed.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE,
               PYTHONPATH=os.pathsep.join([str(tmp_path / "no_tf"), ROOT]))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_on_device.py"), *args],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| on-device augmentation |" in result.stdout
    report = json.loads(out_json.read_text())
    rows = {row["input"]: row for row in report["rows"]}
    assert list(rows) == ["synthetic batch on device", "on-device augmentation",
                          "augmentation alone"]
    for row in rows.values():
        assert len(row["regions_ms"]) == 2 and all(t > 0 for t in row["regions_ms"])
    assert report["dataset_bytes_per_device"] == 64 * 32 * 32 * 3
    assert len(report["load_average_before"]) == 3
