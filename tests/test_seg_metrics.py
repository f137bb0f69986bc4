"""Segmentation metrics against a brute-force per-class loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.segmentation import metrics as seg_metrics

NUM_CLASSES = 6


def random_maps(seed, shape=(2, 17, 13)):
    """Predictions and labels over classes 0..4 (class 5 never appears), 20% ignored pixels."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 5, size=shape)
    pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, 5, size=shape))
    label[rng.random(shape) < 0.2] = 255
    return pred, label


def brute_force_areas(pred, label):
    areas = np.zeros((4, NUM_CLASSES), np.int64)
    for c in range(NUM_CLASSES):
        valid = label != 255
        is_pred, is_label = (pred == c) & valid, (label == c) & valid
        areas[:, c] = [
            np.sum(is_pred & is_label),
            np.sum(is_pred | is_label),
            np.sum(is_pred),
            np.sum(is_label),
        ]
    return areas


def test_jitted_and_numpy_areas_equal_brute_force():
    pred, label = random_maps(0)
    want = brute_force_areas(pred, label)
    jitted = jax.jit(functools.partial(seg_metrics.intersect_and_union, num_classes=NUM_CLASSES))
    np.testing.assert_array_equal(np.stack(jitted(pred, label)), want)
    numpy_areas = seg_metrics.intersect_and_union_numpy(pred, label, NUM_CLASSES)
    np.testing.assert_array_equal(np.stack(numpy_areas), want)


def test_ignored_pixels_do_not_count_even_as_predictions():
    pred = np.array([[1, 1], [2, 0]])
    label = np.array([[1, 255], [255, 255]])
    intersect, union, area_pred, area_label = seg_metrics.intersect_and_union_numpy(pred, label, 3)
    np.testing.assert_array_equal(area_pred, [0, 1, 0])
    np.testing.assert_array_equal(union, [0, 1, 0])
    np.testing.assert_array_equal(intersect, area_label)


def test_dataset_metrics_equal_brute_force_and_skip_absent_classes():
    metrics = seg_metrics.SegMetrics(NUM_CLASSES)
    total = np.zeros((4, NUM_CLASSES), np.int64)
    for seed, shape in [(1, (9, 11)), (2, (2, 7, 5)), (3, (16, 16))]:  # any size per image
        pred, label = random_maps(seed, shape)
        metrics.update(pred, label)
        total += brute_force_areas(pred, label)
    intersect, union, _, area_label = total.astype(float)
    assert union[5] == 0  # class 5 is absent from predictions and labels
    want_iou = [intersect[c] / union[c] for c in range(5)]
    want_acc = [intersect[c] / area_label[c] for c in range(5)]
    got = metrics.compute()
    assert got["aAcc"] == pytest.approx(100 * intersect.sum() / area_label.sum())
    assert got["mIoU"] == pytest.approx(100 * np.mean(want_iou))
    assert got["mAcc"] == pytest.approx(100 * np.mean(want_acc))
    per_class = metrics.per_class()
    assert np.isnan(per_class["IoU"][5]) and np.isnan(per_class["Acc"][5])
    np.testing.assert_allclose(per_class["IoU"][:5], 100 * np.array(want_iou))


def test_class_predicted_but_never_labelled_counts_as_zero_iou():
    metrics = seg_metrics.SegMetrics(3)
    metrics.update(np.array([[0, 2]]), np.array([[0, 0]]))
    per_class = metrics.per_class()
    assert per_class["IoU"][2] == 0.0 and np.isnan(per_class["Acc"][2])
    assert np.isnan(per_class["IoU"][1])  # absent everywhere: excluded
    assert metrics.compute()["mIoU"] == pytest.approx(25.0)  # mean of IoU 50 (class 0) and 0
    assert metrics.compute()["mAcc"] == pytest.approx(50.0)


def test_add_areas_accumulates_jitted_results_and_reset_clears():
    pred, label = random_maps(4)
    metrics = seg_metrics.SegMetrics(NUM_CLASSES)
    metrics.add_areas(seg_metrics.intersect_and_union(pred, label, NUM_CLASSES))
    metrics.add_areas(seg_metrics.intersect_and_union(pred, label, NUM_CLASSES))
    np.testing.assert_array_equal(metrics.areas, 2 * brute_force_areas(pred, label))
    metrics.reset()
    assert not metrics.areas.any()
    assert np.isnan(metrics.compute()["mIoU"])


def test_format_table_lists_every_class_and_the_summary():
    metrics = seg_metrics.SegMetrics(3)
    metrics.update(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]]))
    table = metrics.format_table(["wall", "building", "sky"])
    assert "building" in table and "sky" in table and "nan" in table
    assert "mIoU: 58.33" in table  # IoU wall 50, building 66.67, sky absent
    assert table.endswith("(1 image)")
    metrics.update(np.zeros((3, 2, 2), int), np.zeros((3, 2, 2), int))  # a batch of 3
    assert metrics.num_images == 4
    with pytest.raises(ValueError, match="class names"):
        metrics.format_table(["wall"])


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="resize the logits"):
        seg_metrics.intersect_and_union_numpy(np.zeros((4, 4)), np.zeros((8, 8)), 3)


def test_device_areas_start_a_new_array_before_int32_could_overflow():
    # Each call may add up to 2**30 pixels per class: only one call fits an int32 array.
    zeros = jax.jit(lambda: jnp.zeros((2, 4, NUM_CLASSES), jnp.int32))  # 2 devices' rows
    device_areas = seg_metrics.DeviceAreas(zeros, num_classes=NUM_CLASSES,
                                           max_pixels_per_call=2**30)
    assert device_areas.calls_per_array == 1
    want = np.zeros((4, NUM_CLASSES), np.int64)
    for seed in range(3):
        pred, label = random_maps(seed, shape=(2, 9, 7))  # one image per device
        areas = np.stack([np.stack(seg_metrics.intersect_and_union(one_pred, one_label, 6))
                          for one_pred, one_label in zip(pred, label, strict=True)])
        start = device_areas.current()
        assert not np.asarray(start).any()  # a fresh array each call here
        device_areas.update(start + areas)
        want += brute_force_areas(pred, label)
    np.testing.assert_array_equal(device_areas.host_total(), want)
    assert device_areas.host_total().dtype == np.int64
    # Small calls keep adding into the same array.
    device_areas = seg_metrics.DeviceAreas(zeros, num_classes=NUM_CLASSES, max_pixels_per_call=1)
    first = device_areas.current()
    device_areas.update(first + 1)
    assert np.asarray(device_areas.current()).min() == 1
