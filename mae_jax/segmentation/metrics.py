"""Semantic segmentation metrics as mmseg's IoUMetric: aAcc, mIoU, mAcc over a whole dataset.

Per image, count per class the pixels where prediction and label agree (intersection), the
predicted pixels, and the labelled pixels, all over the non-ignored pixels only; sum those over
the dataset; then IoU = I / U and Acc = I / label per class, and the means are nanmeans (a
class with zero union, or zero label area for Acc, is NaN and left out), in percent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def intersect_and_union(
    pred: jax.Array, label: jax.Array, num_classes: int, ignore_index: int = 255
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """pred, label: int [...] (same shape, any batch dims) -> (area_intersect, area_union,
    area_pred, area_label), each int32 [num_classes], summed over all pixels given.

    jnp version: jit-able with `num_classes` and `ignore_index` static. Pixels whose label is
    `ignore_index` (or outside [0, num_classes)) count nowhere, not even in area_pred.
    """
    pred, label = jnp.asarray(pred), jnp.asarray(label)
    _check_shapes(pred.shape, label.shape)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)

    def count(values, mask):  # bin num_classes collects every masked-out pixel, then dropped
        ids = jnp.where(mask, values, num_classes).reshape(-1)
        return jnp.bincount(ids, length=num_classes + 1)[:num_classes].astype(jnp.int32)

    area_intersect = count(label, valid & (pred == label))
    area_pred = count(pred, valid & (pred >= 0) & (pred < num_classes))
    area_label = count(label, valid)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def intersect_and_union_numpy(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host version of `intersect_and_union` (int64 counts); no recompiles per image size."""
    pred, label = np.asarray(pred).reshape(-1), np.asarray(label).reshape(-1)
    _check_shapes(pred.shape, label.shape)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    pred, label = pred[valid].astype(np.int64), label[valid].astype(np.int64)

    def count(values):
        in_range = values[(values >= 0) & (values < num_classes)]
        return np.bincount(in_range, minlength=num_classes).astype(np.int64)

    area_intersect = count(label[pred == label])
    area_pred, area_label = count(pred), count(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def _check_shapes(pred_shape, label_shape):
    if tuple(pred_shape) != tuple(label_shape):
        raise ValueError(
            f"prediction shape {tuple(pred_shape)} != label shape {tuple(label_shape)}: resize "
            "the logits to the label size before the argmax"
        )


class SegMetrics:
    """Accumulates per-class areas over a dataset (int64 on the host: sums over 2,000 ADE20K
    images exceed int32) and reports aAcc / mIoU / mAcc in percent."""

    def __init__(self, num_classes: int, *, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.areas = np.zeros((4, self.num_classes), np.int64)  # intersect, union, pred, label
        self.num_images = 0  # counted by `update` and the evaluator

    def update(self, pred, label) -> None:
        """pred, label: int [H, W] or [B, H, W] class maps (numpy or jax), same shape."""
        self.num_images += 1 if np.ndim(label) == 2 else np.shape(label)[0]
        self.add_areas(
            intersect_and_union_numpy(
                np.asarray(pred), np.asarray(label), self.num_classes, self.ignore_index
            )
        )

    def add_areas(self, areas: Sequence) -> None:
        """Adds precomputed (intersect, union, pred, label) areas, e.g. from the jitted version."""
        areas = np.stack([np.asarray(a, np.int64) for a in areas])
        if areas.shape != self.areas.shape:
            raise ValueError(f"expected 4 arrays of [{self.num_classes}], got {areas.shape}")
        self.areas += areas

    def per_class(self) -> dict[str, np.ndarray]:
        """{"IoU": [C], "Acc": [C]} in percent; NaN where the class has no union / no label."""
        intersect, union, _, label = self.areas.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return {"IoU": 100.0 * intersect / union, "Acc": 100.0 * intersect / label}

    def compute(self) -> dict[str, float]:
        """{"aAcc", "mIoU", "mAcc"} in percent (means skip NaN classes; NaN if none is left)."""
        intersect, _, _, label = self.areas
        per_class = self.per_class()
        total = label.sum()
        with np.errstate(all="ignore"):
            return {
                "aAcc": float(100.0 * intersect.sum() / total) if total else float("nan"),
                "mIoU": _nanmean(per_class["IoU"]),
                "mAcc": _nanmean(per_class["Acc"]),
            }

    def format_table(self, class_names: Sequence[str] | None = None) -> str:
        """Per-class IoU / Acc table followed by the summary, as mmseg logs it."""
        names = list(class_names) if class_names is not None else []
        if names and len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        names = names or [str(i) for i in range(self.num_classes)]
        per_class = self.per_class()
        width = max(len("Class"), *(len(n) for n in names))
        lines = [f"{'Class':<{width}} | {'IoU':>6} | {'Acc':>6}", "-" * (width + 18)]
        for name, iou, acc in zip(names, per_class["IoU"], per_class["Acc"], strict=True):
            lines.append(f"{name:<{width}} | {_fmt(iou)} | {_fmt(acc)}")
        summary = self.compute()
        lines.append("-" * (width + 18))
        lines.append("  ".join(f"{key}: {_fmt(value).strip()}" for key, value in summary.items())
                     + f"  ({self.num_images} image{'s' if self.num_images != 1 else ''})")
        return "\n".join(lines)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _fmt(value: float) -> str:
    return f"{value:6.2f}" if np.isfinite(value) else f"{'nan':>6}"


class DeviceAreas:
    """Per-class areas summed on the devices, with no host sync while evaluating.

    A program adds each call's areas into an int32 array [devices, 4, num_classes] (one row per
    device) that it gets from `current()` and hands back to `update`. Before the next call could
    overflow int32 (each adds at most `max_pixels_per_call` per class and device), the array is
    set aside and a zero one started; `host_total` sums them all in int64 on the host.
    """

    def __init__(
        self, zeros: Callable[[], jax.Array], *, num_classes: int, max_pixels_per_call: int
    ):
        self._zeros = zeros
        self.num_classes = num_classes
        self.calls_per_array = max(1, (2**31 - 1) // max_pixels_per_call)
        self._full: list[jax.Array] = []
        self._current: jax.Array | None = None
        self._calls = 0

    def current(self) -> jax.Array:
        if self._current is None or self._calls == self.calls_per_array:
            if self._current is not None:
                self._full.append(self._current)
            self._current, self._calls = self._zeros(), 0
        return self._current

    def update(self, areas: jax.Array) -> None:
        self._current = areas
        self._calls += 1

    def host_total(self) -> np.ndarray:
        """int64 [4, num_classes]: the areas of this process's devices (blocks here)."""
        total = np.zeros((4, self.num_classes), np.int64)
        for array in [*self._full, *([self._current] if self._current is not None else [])]:
            for shard in array.addressable_shards:
                total += np.asarray(shard.data, np.int64).reshape(-1, 4, self.num_classes).sum(0)
        return total
