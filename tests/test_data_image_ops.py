"""Per-image ops (mae_jax.data.image_ops) against PIL and torchvision's rules written out.

torchvision is not installable here; its PIL code paths are short and are written out below:
RandomResizedCrop = `img.crop(box).resize((S, S), BICUBIC)`, Resize(s) on the shorter side with
the longer `int(s * long / short)`, CenterCrop at `int(round((side - S) / 2))`.
"""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mae_jax.data import image_ops


def _photo(height, width, seed=0):
    """Smooth gradients + texture + mild noise: a JPEG-friendly stand-in for a photograph."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([120 + 80 * np.sin(cols / (9 + 5 * c) + rows / 23 + c) for c in range(3)], -1)
    image += 30 * np.sin(rows / 4.0)[..., None] * np.cos(cols / 6.0)[..., None]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(pixels, **options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def _pil(encoded):
    return Image.open(io.BytesIO(encoded)).convert("RGB")


def test_crop_boxes_stay_in_range_and_fall_back_to_center():
    for i in range(20):
        seed = tf.constant([i, 7], tf.int64)
        top, left, height, width = (int(v) for v in image_ops.crop_box(seed, 48, 64))
        assert 0 <= top and top + height <= 48 and 0 <= left and left + width <= 64
        assert 0.18 <= height * width / (48 * 64) <= 1.0
        assert 0.7 <= width / height <= 1.4
    # No try fits a 4 x 100 strip: torchvision's center crop with the ratio clamped to 4/3.
    box = image_ops.crop_box(tf.constant([0, 0], tf.int64), 4, 100)
    assert [int(v) for v in box] == [0, 47, 4, 5]
    # The scale range is honoured.
    areas = [np.prod([int(v) for v in image_ops.crop_box(tf.constant([i, 1], tf.int64), 100,
                                                         100, (0.08, 0.1))[2:]]) for i in range(20)]
    assert all(700 <= a <= 1050 for a in areas)


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_jpeg_crop_decodes_exactly_the_pixels_pil_decodes(subsampling):
    encoded = _jpeg(_photo(75, 100), subsampling=subsampling)
    reference = np.asarray(_pil(encoded))  # PIL: libjpeg's accurate integer DCT
    for i in range(12):
        seed = tf.constant([i, subsampling], tf.int64)
        top, left, height, width = (int(v) for v in image_ops.crop_box(seed, 75, 100))
        window = image_ops.decode_random_crop(tf.constant(encoded), seed)
        pixels, first, columns = (np.asarray(v) for v in window)
        crop = pixels[:, first:first + columns]  # the window the resize reads
        np.testing.assert_array_equal(crop, reference[top:top + height, left:left + width])
    # The DCT choice is honoured by decode_and_crop_jpeg: TF's fast one differs from PIL.
    fast = tf.image.decode_and_crop_jpeg(encoded, [0, 0, 75, 100], channels=3,
                                         dct_method="INTEGER_FAST").numpy()
    assert not np.array_equal(fast, reference)


def test_png_and_grayscale_jpeg_decode_to_rgb():
    pixels = _photo(30, 40)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    np.testing.assert_array_equal(image_ops.decode_rgb(tf.constant(png.getvalue())), pixels)
    grey = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(grey, format="JPEG", quality=90)
    decoded = image_ops.decode_rgb(tf.constant(grey.getvalue())).numpy()
    np.testing.assert_array_equal(decoded, np.asarray(_pil(grey.getvalue())))


@pytest.mark.parametrize("shape", [(75, 100), (300, 210), (20, 31), (224, 224)])
def test_bicubic_resize_matches_pil_within_one_grey_level(shape):
    pixels = _photo(*shape)
    for size in [(32, 32), (24, 40)]:
        expected = np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BICUBIC), int)
        got = image_ops.resize_bicubic(tf.constant(pixels), size).numpy()
        difference = np.abs(got.astype(int) - expected)
        # PIL's weights are 22-bit fixed point, ours float32: at most one level.
        assert difference.max() <= 1 and difference.mean() < 0.3
    # Computing a window of the resized image gives that window of the whole (the sums run
    # over differently placed input windows, equal here after rounding to uint8).
    whole = image_ops.resize_bicubic(tf.constant(pixels), (40, 50)).numpy()
    part = image_ops.resize_bicubic(tf.constant(pixels), (40, 50), (5, 9, 16, 24)).numpy()
    np.testing.assert_array_equal(part, whole[5:21, 9:33])


def _torchvision_eval(image: Image.Image, size: int, ratio: float) -> np.ndarray:
    """transforms.Resize(int(size / ratio), BICUBIC) + CenterCrop(size), on a PIL image."""
    short = int(size / ratio)
    width, height = image.size
    if width <= height:
        new = (short, int(short * height / width))
    else:
        new = (int(short * width / height), short)
    image = image.resize(new, Image.BICUBIC)
    top = int(round((new[1] - size) / 2.0))
    left = int(round((new[0] - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), int)


@pytest.mark.parametrize("shape", [(75, 100), (100, 75), (64, 64)])
def test_eval_transform_matches_torchvision_resize_and_center_crop(shape):
    encoded = _jpeg(_photo(*shape))
    for size, ratio in [(32, 224 / 256), (48, 1.0)]:
        expected = _torchvision_eval(_pil(encoded), size, ratio)
        got = image_ops.resize_center_crop(tf.constant(encoded), size, ratio).numpy()
        assert got.shape == (size, size, 3)
        assert np.abs(got.astype(int) - expected).max() <= 1


def test_random_resized_crop_matches_torchvision_with_the_same_box_and_flip():
    encoded = _jpeg(_photo(75, 100))
    flips = set()
    for i in range(8):
        seed = tf.constant([i, 3], tf.int64)
        box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        top, left, height, width = (int(v) for v in image_ops.crop_box(box_seed, 75, 100))
        expected = _pil(encoded).crop((left, top, left + width, top + height))
        expected = expected.resize((32, 32), Image.BICUBIC)
        flip = bool(tf.random.stateless_uniform([], flip_seed) < 0.5)
        flips.add(flip)
        if flip:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        got = image_ops.random_resized_crop(tf.constant(encoded), seed, 32).numpy()
        assert np.abs(got.astype(int) - np.asarray(expected, int)).max() <= 1
    assert flips == {True, False}
