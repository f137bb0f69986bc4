"""Sliding-window evaluation of a segmenter over a validation set (all processes together):
aAcc / mIoU / mAcc, per-class table, eval_results.json and prediction pictures."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.core import sharding as sharding_lib
from mae_jax.core.run_logging import RunLogger
from mae_jax.segmentation.metrics import SegMetrics
from mae_jax.segmentation.sliding_window import num_windows, slide_inference


def data_options(config) -> dict[str, Any]:
    """Keyword arguments shared by the train and eval input pipelines."""
    data = config.data
    options = {
        "source": data.source,
        "data_dir": data.data_dir or None,
        "manual_dir": data.manual_dir or None,
        "scale": tuple(data.scale),
    }
    if data.source == "synthetic":
        options.update(
            num_classes=data.num_classes or None,
            image_size=(data.scene_size, data.scene_size),
            num_examples=data.num_examples or None,
        )
    return options


def class_names(config, num_classes: int) -> list[str]:
    if config.data.source == "ade20k":
        from mae_jax.data.ade20k_meta import ADE20K_CLASSES

        return list(ADE20K_CLASSES)
    return [f"class_{index}" for index in range(num_classes)]


def palette(config, num_classes: int) -> np.ndarray:
    if config.data.source == "ade20k":
        from mae_jax.data.ade20k_meta import ADE20K_PALETTE

        return np.asarray(ADE20K_PALETTE, np.uint8)
    return np.random.default_rng(1).integers(0, 255, (num_classes, 3)).astype(np.uint8)


class Evaluator:
    """Sliding-window evaluation over the validation set; metrics summed over all processes."""

    def __init__(
        self,
        config,
        graphdef,
        mesh,
        num_classes: int,
        workdir: str,
        logger: RunLogger,
    ):
        self.config = config
        self.mesh = mesh
        self.num_classes = num_classes
        self.workdir = workdir
        self.logger = logger
        self.names = class_names(config, num_classes)
        self.palette = palette(config, num_classes)
        long_side, short_side = max(config.data.scale), min(config.data.scale)
        most = max(
            num_windows(
                short_side, long_side, window=config.eval_window, stride=config.eval_stride
            ),
            num_windows(
                long_side, short_side, window=config.eval_window, stride=config.eval_stride
            ),
        )
        local_devices = len(jax.local_devices())
        # A fixed, device-divisible window count: one compilation for every image size.
        self.windows_per_image = math.ceil(most / local_devices) * local_devices
        self.batch_sharding = sharding_lib.batch_sharding(mesh)

        @jax.jit
        def forward(params, rest, windows):
            model = nnx.merge(graphdef, params, rest)
            logits, _ = model(windows, train=False)
            return logits.astype(jnp.float32)

        self.forward = forward

    def _logits_fn(self, state):
        def logits_fn(windows):
            local = np.asarray(windows)
            global_windows = sharding_lib.global_batch_from_host(
                {"image": local}, self.batch_sharding
            )["image"]
            out = self.forward(state.params, state.rest, global_windows)
            shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
            return jnp.concatenate([jnp.asarray(s.data) for s in shards])

        return logits_fn

    def __call__(self, step: int, state) -> dict[str, Any]:
        from mae_jax.data import seg_input

        config = self.config
        examples = seg_input.seg_eval_examples(
            **data_options(config),
            limit=config.data.eval_limit or None,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        metrics = SegMetrics(self.num_classes)
        pictures = []
        logits_fn = self._logits_fn(state)
        examples = list(examples)
        count = len(examples)
        if jax.process_count() > 1:  # every process must run the same number of forwards
            from jax.experimental import multihost_utils

            count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
        for index in range(count):
            dummy = index >= len(examples)
            example = examples[min(index, len(examples) - 1)]
            logits = slide_inference(
                logits_fn,
                jnp.asarray(example["image"]),
                num_classes=self.num_classes,
                window=config.eval_window,
                stride=config.eval_stride,
                output_size=example["label"].shape,
                pad_windows_to=self.windows_per_image,
            )
            if dummy:
                continue
            prediction = np.asarray(jnp.argmax(logits, axis=-1))
            metrics.update(prediction, example["label"])
            if len(pictures) < config.num_pictures:
                pictures.append(self._picture(example, prediction))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            metrics.areas = (
                np.asarray(multihost_utils.process_allgather(metrics.areas))
                .reshape(-1, *metrics.areas.shape)
                .sum(axis=0)
            )
        summary = metrics.compute()
        per_class = metrics.per_class()
        results = dict(summary)
        results["per_class"] = {
            name: {"IoU": _finite(iou), "Acc": _finite(acc)}
            for name, iou, acc in zip(self.names, per_class["IoU"], per_class["Acc"], strict=True)
        }
        results["step"] = int(step)
        if jax.process_index() == 0:
            print(metrics.format_table(self.names), flush=True)
            path = os.path.join(self.workdir, "eval_results.json")
            with open(path + ".tmp", "w") as handle:
                json.dump(results, handle, indent=2)
            os.replace(path + ".tmp", path)
            self.logger.log_eval(step, summary)
            if pictures:
                self.logger.log_images(step, {"segmentation": _stack(pictures)})
        return results

    def _picture(self, example, prediction) -> np.ndarray:
        """image | prediction | ground truth at the label's size, uint8."""
        from PIL import Image

        from mae_jax.data.ade20k_meta import colorize
        from mae_jax.data.constants import denormalize

        height, width = example["label"].shape
        image = (np.asarray(denormalize(example["image"])) * 255).astype(np.uint8)
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        return np.concatenate(
            [image, colorize(prediction, self.palette), colorize(example["label"], self.palette)],
            axis=1,
        )


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _stack(pictures: list[np.ndarray]) -> np.ndarray:
    """Pictures of different sizes stacked vertically on a black canvas."""
    width = max(p.shape[1] for p in pictures)
    rows = [np.pad(p, ((0, 4), (0, width - p.shape[1]), (0, 0))) for p in pictures]
    return np.concatenate(rows, axis=0)
