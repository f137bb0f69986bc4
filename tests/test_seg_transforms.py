"""mmsegmentation's ADE20K transforms: label reduction, rescale, category-ratio crop, alignment."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mae_jax.data import image_ops, photometric, seg_resize
from mae_jax.data import seg_transforms as st
from mae_jax.data.constants import IMAGENET_MEAN_UINT8, IMAGENET_STD, normalize_uint8

# Cube corners: no colour is a blend of the others, so a bilinear blend never looks "pure".
CORNERS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]],
    np.uint8,
)
BLACK = np.zeros(3, np.uint8)  # raw 0 ("other") -> ignore


def _block_scene(seed, height=48, width=64, block=8):
    """Raw label of 8x8 blocks (0..6) and an image whose colour encodes the label."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, len(CORNERS) + 1, size=(height // block, width // block))
    raw = np.kron(blocks, np.ones((block, block), np.int64)).astype(np.uint8)
    table = np.concatenate([BLACK[None], CORNERS])
    return table[raw], raw


def _seed(i):
    return tf.constant([i, 17], tf.int64)


def test_reduce_zero_label_maps_other_to_ignore_and_shifts_classes():
    raw = tf.constant([[0, 1, 2], [150, 255, 7]], tf.uint8)
    expected = [[255, 0, 1], [149, 255, 6]]
    np.testing.assert_array_equal(st.reduce_zero_label(raw).numpy(), expected)


@pytest.mark.parametrize(
    "height, width, scale",
    [
        (300, 400, (2048, 512)),
        (512, 683, (2048, 512)),
        (100, 3000, (2048, 512)),
        (33, 47, (64, 32)),
    ],
)
def test_rescale_size_matches_mmcv(height, width, scale):
    # mmcv.rescale_size, written out.
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    expected = (int(height * factor + 0.5), int(width * factor + 0.5))
    got = st.rescale_size(height, width, scale)
    assert (int(got[0]), int(got[1])) == expected


def test_random_rescale_stays_within_the_ratio_range_and_is_seeded():
    image = tf.zeros([40, 60, 3], tf.uint8)
    label = tf.zeros([40, 60], tf.uint8)
    shapes = set()
    for i in range(12):
        out_image, out_label = st.random_rescale(
            image, label, seed=_seed(i), scale=(128, 32), ratio_range=(0.5, 2.0)
        )
        assert out_image.shape[:2] == out_label.shape
        # Short side bounded by 32 * ratio: between 16 and 64.
        assert 15 <= min(out_label.shape) <= 64
        again, _ = st.random_rescale(image, label, seed=_seed(i), scale=(128, 32))
        assert again.shape == out_image.shape
        shapes.add(tuple(out_label.shape))
    assert len(shapes) > 3


def test_category_ratio_ok_follows_mmseg_rule():
    ok = lambda label: bool(st.category_ratio_ok(tf.constant(label, tf.uint8)))  # noqa: E731
    assert not ok(np.zeros((4, 4)))  # one class
    assert not ok(np.array([[0] * 8 + [1] * 2] * 2))  # 80 %
    assert ok(np.array([[0] * 7 + [1] * 3] * 2))  # 70 %
    # Ignored pixels do not count: 6 of class 0 against 2 of class 1 is exactly 75 %, rejected.
    assert not ok(np.array([[0] * 6 + [1] * 2 + [255] * 2]))
    assert ok(np.array([[0] * 5 + [1] * 2 + [255] * 3]))  # 71 %
    assert not ok(np.array([[3] * 2 + [255] * 8]))  # only ignore besides one class


def _half_flat_half_striped():
    """32 x 128 label: columns 0..63 one class, 64..127 alternating stripes of two classes.
    A 32x32 window satisfies the 0.75 rule only when it starts right of column 40 (~58 %)."""
    label = np.zeros((32, 128), np.uint8)
    label[:, 64:] = 1 + (np.arange(64) % 2)
    return label


def test_category_ratio_crop_never_exceeds_max_ratio_when_a_good_crop_exists():
    label = _half_flat_half_striped()
    image = np.repeat(label[..., None], 3, axis=-1)
    for i in range(40):
        crop_image, crop_label = st.random_crop_with_category_ratio(
            image, label, crop_size=32, seed=_seed(i), cat_max_ratio=0.75
        )
        assert crop_label.shape == (32, 32)
        assert bool(st.category_ratio_ok(crop_label, cat_max_ratio=0.75))
        np.testing.assert_array_equal(crop_image.numpy()[..., 0], crop_label.numpy())


def test_crop_without_ratio_check_does_pick_dominated_windows():
    # Control for the test above: the rule, not luck, keeps the bad windows out.
    label = _half_flat_half_striped()
    bad = sum(
        not bool(
            st.category_ratio_ok(
                st.random_crop_with_category_ratio(
                    label[..., None], label, crop_size=32, seed=_seed(i), cat_max_ratio=1.0
                )[1]
            )
        )
        for i in range(40)
    )
    assert bad >= 5


def test_category_ratio_crop_falls_back_to_a_random_window_when_none_qualifies():
    label = np.full((40, 50), 3, np.uint8)
    image = np.zeros((40, 50, 3), np.uint8)
    crop_image, crop_label = st.random_crop_with_category_ratio(
        image, label, crop_size=(16, 24), seed=_seed(0)
    )
    assert crop_image.shape == (16, 24, 3) and crop_label.shape == (16, 24)


def _pixels(image):
    """The transforms' uint8 output as ints (they no longer normalise: that runs on device)."""
    assert image.dtype == tf.uint8
    return image.numpy().astype(int)


def test_train_transform_keeps_image_and_label_aligned():
    """Pure-colour pixels inside a block carry the block's label. Near a block edge the label's
    nearest pick (cv2 INTER_NEAREST, as mmcv: source = floor(dst * scale)) may be one source
    pixel away from what the bilinear image resize blends, as in mmseg, so only pixels whose
    3x3 label neighbourhood is uniform are checked."""
    for i in range(10):
        image, raw = _block_scene(i)
        out_image, out_label = st.train_transform(
            image, raw, seed=_seed(i), crop_size=32, scale=(96, 48), photometric=False
        )
        out_image, out_label = _pixels(out_image), out_label.numpy()
        padded = np.pad(out_label, 1, mode="edge")
        uniform = np.ones(out_label.shape, bool)
        for dy in range(3):
            for dx in range(3):
                window = padded[dy:dy + out_label.shape[0], dx:dx + out_label.shape[1]]
                uniform &= window == out_label
        pure = np.zeros(out_label.shape, bool)
        for reduced, colour in enumerate(CORNERS):
            is_colour = np.all(np.abs(out_image - colour) <= 1.0, axis=-1) & uniform
            np.testing.assert_array_equal(out_label[is_colour], reduced)
            pure |= is_colour
        is_black = np.all(np.abs(out_image) <= 1.0, axis=-1) & uniform
        np.testing.assert_array_equal(out_label[is_black], 255)
        pure |= is_black
        # Most pixels are block interiors, so the check above covers many of them.
        assert pure[out_label != 255].mean() > 0.3


def test_train_transform_flips_image_and_label_together():
    # Columns hold classes 1..6 left to right; at ratio 1 and scale (48, 32) nothing is resized.
    raw = np.repeat((1 + np.arange(48) // 8)[None].astype(np.uint8), 32, axis=0)
    image = CORNERS[raw - 1]
    directions = set()
    for i in range(12):
        out_image, out_label = st.train_transform(
            image,
            raw,
            seed=_seed(i),
            crop_size=32,
            scale=(48, 32),
            ratio_range=(1.0, 1.0),
            cat_max_ratio=1.0,
            photometric=False,
        )
        out_label = out_label.numpy()
        colours = _pixels(out_image)
        np.testing.assert_array_equal(colours, CORNERS[out_label])
        steps = np.diff(out_label[0].astype(int))
        assert np.all(steps >= 0) or np.all(steps <= 0)
        directions.add(bool(np.all(steps >= 0)))
    assert directions == {True, False}


def test_train_transform_pads_small_images_with_the_mean_colour_and_ignore():
    image, raw = _block_scene(3, height=32, width=32)
    # Scale (32, 16) at ratio 1 shrinks the 32x32 scene to 16x16, inside the 32x32 crop.
    out_image, out_label = st.train_transform(
        image, raw, seed=_seed(0), crop_size=32, scale=(32, 16), ratio_range=(1.0, 1.0)
    )
    assert out_image.shape == (32, 32, 3) and out_image.dtype == tf.uint8
    assert out_label.shape == (32, 32) and out_label.dtype == tf.uint8
    out_image, out_label = out_image.numpy(), out_label.numpy()
    assert np.all(out_label[16:] == 255) and np.all(out_label[:, 16:] == 255)
    # mmseg pads the normalised image with 0: after normalize_uint8 the uint8 padding is 0 to
    # within rounding (half a grey level over the channel's std).
    padding = [out_image[16:].reshape(-1, 3), out_image[:16, 16:].reshape(-1, 3)]
    padded = normalize_uint8(np.concatenate(padding)[:, None, :])
    assert np.all(np.abs(padded) <= 0.5 / (255 * np.array(IMAGENET_STD)))
    assert np.any(out_label[:16, :16] != 255)


def test_train_transform_is_a_function_of_its_seed():
    image, raw = _block_scene(5)
    run = lambda i: st.train_transform(image, raw, seed=_seed(i), crop_size=32, scale=(96, 48))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


def test_photometric_distortion_changes_colours_not_geometry():
    image, _ = _block_scene(7)
    image = tf.constant(np.clip(image.astype(int) // 2 + 60, 0, 255).astype(np.uint8))
    changed = 0
    for i in range(8):
        out = st.photometric_distortion(image, seed=_seed(i))
        assert out.dtype == tf.uint8 and out.shape == image.shape
        np.testing.assert_array_equal(out.numpy(), st.photometric_distortion(image, seed=_seed(i)))
        changed += not np.array_equal(out.numpy(), image.numpy())
    assert changed >= 6  # each of 4 distortions fires with p 0.5: all off only 1 time in 16


def test_eval_transform_resizes_image_and_keeps_label_at_original_size():
    image, raw = _block_scene(2, height=40, width=64)
    out_image, out_label = st.eval_transform(image, raw, scale=(64, 32))
    assert out_image.shape == (32, 51, 3) and out_image.dtype == tf.uint8  # 64 * 32 / 40 = 51.2
    np.testing.assert_array_equal(out_label.numpy(), np.where(raw == 0, 255, raw.astype(int) - 1))


def _stepwise_train_transform(image, raw, seed, crop, scale):
    """mmseg's train pipeline as the separate steps run it (each pinned on its own: rescale and
    label resize against OpenCV, the crop rule, photometric against mmseg + OpenCV): reduce,
    rescale the whole image and label, crop, flip, distort, pad (numpy)."""
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    label = st.reduce_zero_label(tf.constant(raw))
    image, label = st.random_rescale(image, label, seed=seeds[0], scale=scale)
    image, label = st.random_crop_with_category_ratio(image, label, crop_size=crop, seed=seeds[1])
    image, label = image.numpy(), label.numpy()
    if tf.random.stateless_uniform([], seeds[2]) < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = st.photometric_distortion(np.ascontiguousarray(image), seed=seeds[3]).numpy()
    out_image = np.empty((crop, crop, 3), np.uint8)
    out_image[:] = IMAGENET_MEAN_UINT8
    out_label = np.full((crop, crop), 255, np.uint8)
    out_image[: image.shape[0], : image.shape[1]] = image
    out_label[: label.shape[0], : label.shape[1]] = label
    return out_image, out_label


def test_train_transform_equals_the_steps_run_one_after_another():
    """train_transform computes only what the crop keeps (label windows picked from the original
    label, the image rounded only inside the crop): equal to the whole-image steps, exactly, with
    the distortion on the host or (device_photometric) applied by the accelerator's
    photometric.apply_photometric, and from JPEG bytes as from their pixels. Scenes from 40x56 to
    96x72 at scale (96, 48) / (48, 24) and ratios 0.5-2: crops cut from larger images and padded
    smaller ones, failed crop tries."""
    transform = st.train_transform  # eagerly: tracing each shape would cost ~20x more
    padded = 0
    for i in range(16):
        image, raw = _block_scene(i, height=(40, 96)[i % 2], width=(56, 72)[i % 3 % 2])
        crop, scale = 32, ((96, 48), (48, 24))[i % 4 // 2]
        expected = _stepwise_train_transform(image, raw, _seed(i), crop, scale)
        out = transform(image, raw, seed=_seed(i), crop_size=crop, scale=scale)
        np.testing.assert_array_equal(out[0].numpy(), expected[0], err_msg=f"example {i}")
        np.testing.assert_array_equal(out[1].numpy(), expected[1], err_msg=f"example {i}")
        undistorted, label, params = transform(image, raw, seed=_seed(i), crop_size=crop,
                                               scale=scale, device_photometric=True)
        np.testing.assert_array_equal(label.numpy(), expected[1])
        on_device = photometric.apply_photometric(undistorted.numpy()[None], params.numpy()[None])
        np.testing.assert_array_equal(np.asarray(on_device)[0], expected[0])
        padded += bool(np.any(expected[1][-1] == 255) and params.numpy()[-2] < crop)
        # From JPEG bytes (decoded only where the crop reads them): as from the decoded pixels.
        encoded = _encoded(image, "JPEG", quality=85)
        from_bytes = transform(encoded, raw, seed=_seed(i), crop_size=crop, scale=scale)
        from_pixels = transform(image_ops.decode_rgb(encoded), raw, seed=_seed(i),
                                crop_size=crop, scale=scale)
        np.testing.assert_array_equal(from_bytes[0].numpy(), from_pixels[0].numpy())
    assert padded >= 2


def test_resize_image_window_equals_the_window_of_the_whole_resize():
    """resize_image_window (a window of TF's bilinear resize, computed alone when the resized
    image is large) vs resize_image(...)[window]: exact, for shrinking and enlarging, windows
    at the borders and inside, both code paths."""
    rng = np.random.default_rng(0)
    paths = set()
    for _ in range(24):
        height, width = rng.integers(20, 90, 2)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        scaled = np.array([height, width]) * rng.uniform(0.4, 2.5)
        size = tuple(int(s) for s in np.maximum(scaled, 1))
        crop_h, crop_w = min(size[0], int(rng.integers(8, 40))), min(size[1], 32)
        top, left = rng.integers(0, size[0] - crop_h + 1), rng.integers(0, size[1] - crop_w + 1)
        window = st.resize_image_window(tf.constant(image), size, top, left, crop_h, crop_w)
        expected = st.resize_image(tf.constant(image), size)[top:top + crop_h, left:left + crop_w]
        np.testing.assert_array_equal(window.numpy(), expected.numpy())
        paths.add(size[0] * size[1] > seg_resize.WINDOW_ONLY_AREA * crop_h * crop_w)
        # From the encoded bytes (a JPEG, 4:2:0 chroma, decoded only where the window reads
        # it; a PNG, decoded whole): the same as from the whole decode.
        for encoded in (_encoded(image, "JPEG", quality=90), _encoded(image, "PNG")):
            decoded = image_ops.decode_rgb(tf.constant(encoded))
            expected = st.resize_image(decoded, size)[top:top + crop_h, left:left + crop_w]
            window = st.resize_image_window(tf.constant(encoded), size, top, left, crop_h, crop_w)
            np.testing.assert_array_equal(window.numpy(), expected.numpy())
    assert paths == {True, False}


def _encoded(image, format, **options):
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=format, **options)
    return out.getvalue()
