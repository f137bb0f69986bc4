"""Sliding-window inference: window placement, overlap normalisation, padding, output size."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mae_jax.segmentation import sliding_window

CLASSES = 5


def position_dependent_logits(windows):
    """[n, s, s, 3] -> [n, s, s, 5]: depends on the pixel AND its place in the window, so
    overlapping windows disagree and the averaging is visible."""
    size = windows.shape[1]
    ramp = jnp.arange(size, dtype=jnp.float32)[None, :, None, None] / size
    return jnp.concatenate([windows, windows[..., :1] ** 2 + ramp, windows[..., 1:2] - ramp], -1)


def mmseg_slide_reference(logits_fn, image, window, stride):
    """mmseg's loop, written out in numpy (every test image here is >= the window)."""
    h, w = image.shape[:2]
    preds = np.zeros((h, w, CLASSES))
    count = np.zeros((h, w, 1))
    for row in range(max(h - window + stride - 1, 0) // stride + 1):
        for col in range(max(w - window + stride - 1, 0) // stride + 1):
            y1, x1 = row * stride, col * stride
            y2, x2 = min(y1 + window, h), min(x1 + window, w)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            preds[y1:y2, x1:x2] += np.asarray(logits_fn(image[None, y1:y2, x1:x2]))[0]
            count[y1:y2, x1:x2] += 1
    return preds / count


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).normal(size=(h, w, 3)).astype(np.float32)


def test_window_boxes_follow_mmseg_grid_and_clamp_to_the_border():
    assert sliding_window.window_boxes(512, 683, window=512, stride=341) == [
        (0, 512, 0, 512),
        (0, 512, 171, 683),
    ]
    assert sliding_window.num_windows(512, 2048) == 6  # widest ADE20K test image
    assert sliding_window.num_windows(2048, 512) == 6
    assert sliding_window.window_boxes(20, 24, window=32, stride=21) == [(0, 20, 0, 24)]


def test_constant_logits_average_to_exactly_one_and_keep_the_original_size():
    image = random_image(40, 70)
    out = sliding_window.slide_inference(
        lambda w: jnp.ones((*w.shape[:3], CLASSES)),
        image,
        num_classes=CLASSES,
        window=32,
        stride=21,
    )
    assert out.shape == (40, 70, CLASSES)
    assert jnp.all(out == 1.0)  # overlaps up to 4 windows deep: count normalisation is exact
    resized = sliding_window.slide_inference(
        lambda w: jnp.ones((*w.shape[:3], CLASSES)),
        image,
        num_classes=CLASSES,
        window=32,
        stride=21,
        output_size=(57, 101),
    )
    assert resized.shape == (57, 101, CLASSES)
    np.testing.assert_allclose(resized, 1.0, atol=1e-6)


def test_overlapping_windows_equal_mmseg_loop():
    image = random_image(40, 70)
    got = sliding_window.slide_inference(
        position_dependent_logits, image, num_classes=CLASSES, window=32, stride=21
    )
    want = mmseg_slide_reference(position_dependent_logits, image, window=32, stride=21)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_window_larger_than_image_is_one_padded_forward_pass():
    image = random_image(20, 24)
    got = sliding_window.slide_inference(
        position_dependent_logits,
        image,
        num_classes=CLASSES,
        window=32,
        stride=21,
        output_size=(30, 37),
    )
    padded = np.pad(image, ((0, 12), (0, 8), (0, 0)))  # documented: zero-pad bottom / right
    single = np.asarray(position_dependent_logits(jnp.asarray(padded[None])))[0, :20, :24]
    want = (
        F.interpolate(
            torch.from_numpy(single.transpose(2, 0, 1)[None].copy()),
            size=(30, 37),
            mode="bilinear",
            align_corners=False,
        )[0]
        .numpy()
        .transpose(1, 2, 0)
    )
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_low_resolution_logits_are_resized_to_the_window():
    image = random_image(32, 53)

    def quarter_resolution(windows):  # like UPerNet: logits at 1/4 of the input
        return position_dependent_logits(windows[:, ::4, ::4])

    def upsampled(windows):
        logits = quarter_resolution(windows)
        torch_logits = torch.from_numpy(np.asarray(logits).transpose(0, 3, 1, 2).copy())
        full = F.interpolate(torch_logits, size=(32, 32), mode="bilinear", align_corners=False)
        return full.numpy().transpose(0, 2, 3, 1)

    got = sliding_window.slide_inference(
        quarter_resolution, image, num_classes=CLASSES, window=32, stride=21
    )
    np.testing.assert_allclose(got, mmseg_slide_reference(upsampled, image, 32, 21), atol=1e-5)


def test_windows_padded_to_a_fixed_batch_give_the_same_result():
    image = random_image(40, 70)
    batch_sizes = []

    def recording(windows):
        batch_sizes.append(windows.shape[0])
        return position_dependent_logits(windows)

    plain = sliding_window.slide_inference(
        recording, image, num_classes=CLASSES, window=32, stride=21
    )
    padded = sliding_window.slide_inference(
        recording, image[None], num_classes=CLASSES, window=32, stride=21, pad_windows_to=8
    )
    assert batch_sizes == [6, 8]  # one call per image, all windows batched
    np.testing.assert_array_equal(plain, padded)
    with pytest.raises(ValueError, match="pad_windows_to"):
        sliding_window.slide_inference(
            recording, image, num_classes=CLASSES, window=32, stride=21, pad_windows_to=4
        )


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="one image"):
        sliding_window.slide_inference(
            position_dependent_logits,
            np.zeros((2, 8, 8, 3)),
            num_classes=CLASSES,
            window=8,
            stride=4,
        )
    with pytest.raises(ValueError, match="logits_fn returned"):
        sliding_window.slide_inference(
            position_dependent_logits, np.zeros((8, 8, 3)), num_classes=3, window=8, stride=4
        )
