"""Sliding-window inference: window placement, overlap normalisation, padding, output size; the
fixed-canvas kernels of the evaluation against the per-image path and torch's interpolate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mae_jax.segmentation import canvas, sliding_window

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


# --------------------------------------------------------------------------- Fixed canvases
# Test-scale sizes of one 24x40 canvas (scale (40, 24)), window 16, stride 11: smaller than the
# window in one or both dimensions, non-multiples of the stride, portrait (stored transposed).
SIZES = [(24, 40), (12, 30), (20, 33), (40, 24), (9, 13), (33, 17), (30, 12), (24, 24)]
LAYOUT = canvas.CanvasLayout.for_scale((40, 24), window=16, stride=11, images_per_call=4,
                                       windows_per_call=12, tile=8, tiles_per_call=40)


def quarter_resolution_logits(windows):  # like UPerNet: logits at 1/4 of the input
    return position_dependent_logits(windows[:, ::4, ::4])


@functools.cache
def jitted_stitch(logits_fn):
    return jax.jit(functools.partial(
        sliding_window.stitch_windows, logits_fn, window=16, num_classes=CLASSES
    ))


resize_tiles = jax.jit(jax.vmap(sliding_window.resize_tile, in_axes=(None, 0, 0, 0, 0, 0)))


def canvas_logits(logits_fn, examples, *, resize=False):
    """Canvas path: examples -> per example [h, w, C] averaged logits (resize: [H, W, C] at the
    label's size, assembled from tiles), in the original orientation."""
    out = []
    for call in canvas.pack(examples, LAYOUT, num_devices=1):
        inputs = canvas.stitch_inputs(call, LAYOUT, canvas.image_dtype(call))
        canvases = jitted_stitch(logits_fn)(*(value[0] for value in inputs.values()))
        assembled = {placed.index: np.zeros((*placed.label.shape, CLASSES), np.float32)
                     for placed in call[0]}
        for chunk in range(canvas.num_score_calls(call, LAYOUT) if resize else 0):
            arrays, owners = canvas.score_inputs(call, LAYOUT, chunk)
            tables = [arrays[key][0] for key in
                      ("tile_slot", "row_index", "row_weight", "col_index", "col_weight")]
            tiles = resize_tiles(canvases, *tables)
            for (placed, (top, left)), values in zip(owners[0], tiles, strict=False):
                part = assembled[placed.index][top:top + LAYOUT.tile, left:left + LAYOUT.tile]
                part[...] = values[:part.shape[0], :part.shape[1]]
        for slot, placed in enumerate(call[0]):
            height, width = placed.image.shape[:2]
            logits = assembled[placed.index] if resize else canvases[slot, :height, :width]
            logits = np.asarray(logits)
            out.append(logits.transpose(1, 0, 2) if placed.transposed else logits)
    return out


@pytest.mark.parametrize("logits_fn", [position_dependent_logits, quarter_resolution_logits])
def test_canvas_stitching_equals_the_per_image_path_for_every_size(logits_fn):
    examples = [{"image": random_image(h, w, seed=i), "label": np.zeros((h, w), np.int32)}
                for i, (h, w) in enumerate(SIZES)]
    got = canvas_logits(logits_fn, examples)
    for example, logits in zip(examples, got, strict=True):
        want = sliding_window.slide_inference(
            logits_fn, example["image"], num_classes=CLASSES, window=16, stride=11
        )
        np.testing.assert_allclose(logits, want, atol=1e-5)
    # 8 sizes in 5 calls: one compiled program.
    assert jitted_stitch(logits_fn)._cache_size() == 1


def test_uint8_images_are_normalised_on_the_device_with_the_pipeline_statistics():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES[:3]]
    # mmseg's ADE20K normalisation, written out (REFERENCE.md).
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    as_uint8 = canvas_logits(position_dependent_logits,
                             [{"image": image, "label": np.zeros((1, 1))} for image in images])
    as_float = canvas_logits(position_dependent_logits, [
        {"image": ((image - mean) / std).astype(np.float32), "label": np.zeros((1, 1))}
        for image in images
    ])
    for got, want in zip(as_uint8, as_float, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_tiles_resize_like_torch_interpolate_to_the_original_size():
    # Up- and down-sampling, an identity, portrait: the label sizes of the original images.
    cases = [((24, 40), (30, 57)), ((12, 30), (7, 19)), ((20, 33), (20, 33)), ((40, 24), (61, 26))]
    examples = [{"image": random_image(h, w, seed=i), "label": np.zeros(label, np.int32)}
                for i, ((h, w), label) in enumerate(cases)]
    averaged = canvas_logits(position_dependent_logits, examples)
    resized = canvas_logits(position_dependent_logits, examples, resize=True)
    for example, logits, got in zip(examples, averaged, resized, strict=True):
        per_image = sliding_window.slide_inference(
            position_dependent_logits, example["image"], num_classes=CLASSES, window=16,
            stride=11, output_size=example["label"].shape,
        )
        np.testing.assert_allclose(got, per_image, atol=1e-5)
        want = F.interpolate(torch.from_numpy(logits.transpose(2, 0, 1)[None].copy()),
                             size=example["label"].shape, mode="bilinear", align_corners=False)
        # torch computes source coordinates in float32 (ours: float64): rtol covers that.
        np.testing.assert_allclose(got, want[0].numpy().transpose(1, 2, 0), atol=1e-5,
                                   rtol=1e-5)


def test_layout_rejects_images_beyond_the_canvas_and_too_few_windows():
    with pytest.raises(ValueError, match="data.scale"):
        canvas.place({"image": np.zeros((25, 30, 3), np.float32), "label": np.zeros((5, 5))},
                     LAYOUT)
    with pytest.raises(ValueError, match="windows_per_call"):
        canvas.CanvasLayout.for_scale((2048, 512), window=512, stride=341, windows_per_call=4)
    mixed = [{"image": np.zeros((8, 8, 3), dtype), "label": np.zeros((8, 8))}
             for dtype in (np.uint8, np.float32)]
    with pytest.raises(ValueError, match="mix uint8 and float"):
        canvas.image_dtype(next(canvas.pack(mixed, LAYOUT, num_devices=1)))
