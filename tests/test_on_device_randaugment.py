"""The on-device input for fine-tuning (mae_jax.data.on_device.OnDeviceIterator with labels,
crop_scale and randaugment; its draws from mae_jax.data.randaugment_draws).

References: the numpy encoding against the TensorFlow one of the canvas path (bit for bit;
that one is pinned to timm's PIL calls in tests/test_randaugment_device.py); the draws against
timm 0.3.2's distributions (written out as in tests/test_randaugment.py); the iterator's images
against PIL's crop + bicubic resize + flip followed by timm's ops replayed with PIL for the
iterator's own draws (tolerances of tests/test_randaugment_device.py's `assert_close`).
"""

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_randaugment import _scene, timm_level_to_arg, timm_op
from test_randaugment_device import assert_close

from mae_jax.core import sharding as sharding_lib
from mae_jax.data import on_device
from mae_jax.data import randaugment as ra
from mae_jax.data import randaugment_draws as draws
from mae_jax.data import randaugment_program as program

POLICY = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def mesh():
    return sharding_lib.create_mesh(data=-1, fsdp=1)


def test_numpy_encoding_equals_the_tensorflow_encoding_bit_for_bit():
    names = sorted(set(ra.RAND_OPS) | set(ra.RAND_INCREASING_OPS))
    rng = np.random.default_rng(0)
    levels = np.concatenate([[0.0, 10.0, 9.0, 4.5], rng.uniform(0, 10, 12)])
    for size in (32, 37, 224):
        for index, name in enumerate(names):
            for negate in (False, True):
                codes, args = draws.encode(names, np.full(len(levels), index), levels,
                                           np.full(len(levels), negate), size)
                for level, code, arg in zip(levels, codes, args, strict=True):
                    want_code, want = program._encode(name, size, tf.constant(level, tf.float64),
                                                      tf.constant(negate), 0.45)
                    assert code == want_code.numpy(), name
                    np.testing.assert_array_equal(arg, tf.cast(want, tf.float32).numpy(),
                                                  err_msg=f"{name} {level} {negate} {size}")


def test_draws_follow_timms_distributions():
    n = 20000
    rng = np.random.default_rng(5)
    d = draws.draw_layers(rng, (n // 2, 2), num_ops=15)
    counts = np.bincount(d["op_index"].ravel(), minlength=15)
    assert counts.size == 15 and np.all(np.abs(counts / n - 1 / 15) < 5 * np.sqrt(1 / 15 / n))
    assert abs(d["apply"].mean() - 0.5) < 0.02 and abs(d["negate"].mean() - 0.5) < 0.02
    # timm: magnitude = min(10, max(0, random.gauss(9, 0.5))).
    mag = d["magnitude"]
    ref = np.clip(np.random.default_rng(0).normal(9.0, 0.5, n), 0, 10)
    assert mag.min() >= 0 and mag.max() == 10.0
    assert abs(mag.mean() - ref.mean()) < 0.02 and abs(mag.std() - ref.std()) < 0.02
    assert abs((mag == 10).mean() - 0.02275) < 0.006  # P(gauss > 10) = P(z > 2)
    fixed = draws.draw_layers(rng, (50, 2), num_ops=15, magnitude_std=0)
    assert (fixed["magnitude"] == 9.0).all()
    often = draws.draw_layers(rng, (n, 1), num_ops=15, prob=0.8)  # applied when random() <= p
    assert abs(often["apply"].mean() - 0.8) < 0.02
    # The two layers of an image are drawn independently (op pairs cover the 15 x 15 grid).
    assert len(set(map(tuple, d["op_index"]))) == 225
    programs = draws.draw_programs(rng, 4000, 32, **ra.parse_rand_augment(POLICY))
    skipped = programs["ra_code"] == draws.CODE["identity"]
    assert abs(skipped.mean() - 0.5) < 0.02  # a layer is applied with probability 0.5
    with pytest.raises(ValueError, match="magnitude_std"):
        draws.draw_layers(rng, (2, 2), num_ops=15, magnitude_std=-1)


SIZE, SOURCE = 40, 32  # 32 px images cropped and enlarged to 40, as CIFAR to 224


def _reference(image, box, flip, layers, names):
    """PIL: crop, bicubic resize, flip (torchvision), then timm's ops for the draws."""
    top, left, h, w = (int(v) for v in box)
    out = Image.fromarray(image).crop((left, top, left + w, top + h))
    out = out.resize((SIZE, SIZE), Image.BICUBIC)
    out = np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out)
    for op, applied, level, negate in zip(*layers, strict=True):
        if applied:
            out = timm_op(out, names[op], timm_level_to_arg(names[op], level, negate, SIZE,
                                                            SIZE))
    return out


@pytest.mark.parametrize("policy", [POLICY, "rand-n3-m5-mstd0-inc0"])
def test_iterator_gives_pil_crops_with_timms_ops_for_its_draws_and_resumes(mesh, policy):
    """Labelled images, RandomResizedCrop(scale (0.08, 1)) + flip + RandAugment on the devices:
    every image equals PIL + timm for the crop, flip and layers the iterator drew (the
    official policy, and another one: 3 layers of the plain ops at a fixed magnitude 5), its
    label is its example's, and an iterator started at step 1 gives step 1 again."""
    images = np.stack([_scene(SOURCE, SOURCE, seed) for seed in range(16)])
    labels = np.arange(16) % 5
    common = dict(mesh=mesh, image_size=SIZE, global_batch_size=8, seed=3, labels=labels,
                  crop_scale=(0.08, 1.0), randaugment=policy)
    iterator = on_device.OnDeviceIterator(images, **common)
    parsed = ra.parse_rand_augment(policy)
    names = ra.op_names(parsed["increasing"])
    params = jax.jit(lambda keys: on_device.random_params(keys, SOURCE, SOURCE, (0.08, 1.0)))
    seen, batches = set(), []
    for step in range(3):
        batch = next(iterator)
        batches.append(np.asarray(batch["image"]))
        ids = iterator.schedule.ids(step)
        np.testing.assert_array_equal(batch["label"], labels[ids[:, 0]])
        assert batch["label"].dtype == np.int32
        boxes, flips = params(jax.vmap(lambda row: on_device.example_key(3, row))(ids))
        rng = np.random.default_rng([on_device.RANDAUGMENT_STREAM, 3, 0, step])
        layers = draws.draw_layers(rng, (8, parsed["num_layers"]), num_ops=15,
                                   magnitude=parsed["magnitude"],
                                   magnitude_std=parsed["magnitude_std"])
        if policy != POLICY:
            assert (layers["magnitude"] == 5.0).all() and layers["op_index"].shape == (8, 3)
        for i, (index, box, flip) in enumerate(zip(ids[:, 0], np.asarray(boxes),
                                                   np.asarray(flips), strict=True)):
            example = [layers[k][i] for k in ("op_index", "apply", "magnitude", "negate")]
            seen |= {names[op] for op, applied in zip(*example[:2], strict=True) if applied}
            assert_close(batches[-1][i], _reference(images[index], box, flip, example, names))
    assert len(seen) >= 8  # many ops hit
    resumed = on_device.OnDeviceIterator(images, start_step=1, **common)
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), batches[1])


def test_bad_classification_inputs_fail_with_the_fix_named(mesh):
    images = np.zeros((8, 8, 8, 3), np.uint8)
    common = dict(mesh=mesh, image_size=8, global_batch_size=4, seed=0)
    for changes, message in [
        ({"labels": np.zeros(7, int)}, r"labels must be integers \[8\]"),
        ({"labels": np.zeros(8, np.float32)}, "labels must be integers"),
        ({"randaugment": POLICY, "augment": False}, "randaugment needs augment=True"),
        ({"randaugment": "rand-x3"}, "unknown section"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            on_device.OnDeviceIterator(images, **common, **changes)
