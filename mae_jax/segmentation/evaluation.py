"""Sliding-window evaluation of a segmenter over a validation set (all processes together):
aAcc / mIoU / mAcc, per-class table, eval_results.json and prediction pictures.

Two compiled programs serve every image size (`canvas.py` lays the inputs out): "stitch" runs
the windows of several images through the model and averages them on fixed canvases, "score"
resizes the averaged logits to each label's original size tile by tile, takes the argmax and
adds the per-class areas into a device array. The host only lays out the next call while the
device works; nothing is read back until the end (except the few pictures).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mae_jax.core import sharding as sharding_lib
from mae_jax.core.processes import (
    failing_together,
    failure_status,
    raise_for,
    sum_over_processes,
)
from mae_jax.core.run_logging import RESULTS_FILE, RunLogger, write_results
from mae_jax.segmentation import canvas
from mae_jax.segmentation.metrics import DeviceAreas, SegMetrics, intersect_and_union
from mae_jax.segmentation.sliding_window import resize_tile, stitch_windows


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
    """Sliding-window evaluation over the validation set; metrics summed over all processes.

    images_per_call, windows_per_call, tile, tiles_per_call: per device and call (see
    `canvas.CanvasLayout.for_scale`); they set memory and speed, never the result.
    """

    def __init__(
        self,
        config,
        graphdef,
        mesh,
        num_classes: int,
        workdir: str,
        logger: RunLogger,
        *,
        images_per_call: int = 8,
        windows_per_call: int | None = None,
        tile: int | None = None,
        tiles_per_call: int | None = None,
    ):
        self.config = config
        self.mesh = mesh
        self.num_classes = num_classes
        self.workdir = workdir
        self.logger = logger
        self.names = class_names(config, num_classes)
        self.palette = palette(config, num_classes)
        self.layout = canvas.CanvasLayout.for_scale(
            config.data.scale, window=config.eval_window, stride=config.eval_stride,
            images_per_call=images_per_call, windows_per_call=windows_per_call, tile=tile,
            tiles_per_call=tiles_per_call,
        )
        self.local_devices = len(mesh.local_devices)
        self.batch_sharding = sharding_lib.batch_sharding(mesh)
        self._stitch, self._score, self._zeros = _programs(
            graphdef, mesh, self.layout, num_classes
        )

    def __call__(self, step: int, state) -> dict[str, Any]:
        from mae_jax.data import seg_eval_input

        config = self.config
        examples = seg_eval_input.seg_eval_examples(
            **data_options(config),
            limit=config.data.eval_limit or None,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        metrics, pictures = self.evaluate(state, examples, num_pictures=config.num_pictures)
        summary = metrics.compute()
        per_class = metrics.per_class()
        results = dict(summary)
        results["per_class"] = {
            name: {"IoU": _finite(iou), "Acc": _finite(acc)}
            for name, iou, acc in zip(self.names, per_class["IoU"], per_class["Acc"], strict=True)
        }
        results["num_images"] = metrics.num_images
        results["step"] = int(step)
        with failing_together(f"writing the evaluation of step {step}"):
            if jax.process_index() == 0:
                print(metrics.format_table(self.names), flush=True)
                write_results(self.workdir, results,
                              keep_other=bool(self.config.get("eval_only", False)))
                self.logger.log_eval(step, summary)
                if pictures:
                    self.logger.log_images(step, {"segmentation": _stack(pictures)})
        return results

    def recorded(self, step: int) -> dict[str, Any]:
        """What eval_results.json holds when it is the evaluation of `step` (an earlier run's,
        e.g. before a resume that only exports), else {} (this host's view of the file)."""
        try:
            with open(os.path.join(self.workdir, RESULTS_FILE)) as f:
                results = json.load(f)
        except (OSError, ValueError):
            return {}
        return results if isinstance(results, dict) and results.get("step") == step else {}

    def evaluate(self, state, examples, *, num_pictures: int = 0):
        """This process's share of the validation set -> (SegMetrics summed over all
        processes, pictures).

        examples: any iterable (read lazily, one call at a time) of {"image": [h, w, 3] at test
        scale, float32 normalised or uint8 (normalised on the device), "label": [H, W] int at
        the original size, 255 ignored}. pictures: image | prediction | ground truth of the
        first `num_pictures` examples of process 0's share (with P processes, validation
        records 0, P, 2P, ...; empty on the other processes).
        """
        layout = self.layout
        areas = DeviceAreas(self._zeros, num_classes=self.num_classes,
                            max_pixels_per_call=layout.tiles * layout.tile**2)
        pictures: dict[int, np.ndarray] = {}
        seen = [0]  # this process's examples

        def counted():
            for example in examples:
                seen[0] += 1
                yield example

        calls = canvas.pack(counted(), layout, self.local_devices)
        dtype, several = None, jax.process_count() > 1
        failed: Exception | None = None  # this process's, told to the others at `_agree`
        while True:
            call = None
            try:  # reading the examples (a file server's error), this process's pictures
                call = None if failed else next(calls, None)
            except Exception as error:  # noqa: BLE001 - the other processes must hear of it
                if not several:
                    raise
                failed = error
            dtype = (canvas.image_dtype(call) if call else None) or dtype
            score_calls = canvas.num_score_calls(call, layout) if call else 0
            more = call is not None
            if several:  # every process runs the same programs, in step
                more, score_calls, dtype = _agree(more, score_calls, dtype, failed)
                call = call or [[] for _ in range(self.local_devices)]
            if not more:
                break
            inputs = canvas.stitch_inputs(call, layout, dtype)
            canvases = self._stitch(state.params, state.rest, *self._global(inputs))
            for chunk in range(score_calls):
                inputs, owners = canvas.score_inputs(call, layout, chunk)
                new_areas, predictions = self._score(
                    canvases, areas.current(), *self._global(inputs)
                )
                areas.update(new_areas)
                try:
                    self._collect(predictions, owners, num_pictures, pictures)
                except Exception as error:  # noqa: BLE001 - told at the next `_agree`
                    if not several:
                        raise
                    failed = failed or error
        metrics = SegMetrics(self.num_classes)
        metrics.add_areas(areas.host_total())
        # Pixel counts past 2**31 a class stay exact (int64 would travel as int32); the image
        # count travels with them.
        totals = sum_over_processes(np.append(metrics.areas.ravel(), seen[0]))
        metrics.areas = totals[:-1].reshape(metrics.areas.shape)
        metrics.num_images = int(totals[-1])
        return metrics, [pictures[index] for index in sorted(pictures)]

    def _global(self, inputs: dict[str, np.ndarray]) -> list[jax.Array]:
        """Local per-device arrays [L, ...] -> global arrays [devices, ...], in input order."""
        return list(sharding_lib.global_batch_from_host(inputs, self.batch_sharding).values())

    def _collect(self, predictions, owners, num_pictures, pictures) -> None:
        """Pastes the predicted tiles of the first `num_pictures` examples (process 0 only)."""
        wanted = [(device, k) for device, tiles in enumerate(owners)
                  for k, (placed, _) in enumerate(tiles) if placed.index < num_pictures]
        if not wanted or jax.process_index() != 0:
            return
        shards = sorted(predictions.addressable_shards, key=lambda s: s.index[0].start or 0)
        local = [np.asarray(shard.data)[0] for shard in shards]
        for device, k in wanted:
            placed, corner = owners[device][k]
            placed.predicted[corner] = local[device][k]
            prediction = placed.prediction()
            if prediction is not None:
                pictures[placed.index] = self._picture(placed.example, prediction)

    def _picture(self, example, prediction) -> np.ndarray:
        """image | prediction | ground truth at the label's size, uint8."""
        from PIL import Image

        from mae_jax.data.ade20k_meta import colorize
        from mae_jax.data.constants import denormalize

        height, width = example["label"].shape
        image = np.asarray(example["image"])
        if image.dtype != np.uint8:
            image = (np.asarray(denormalize(image)) * 255).astype(np.uint8)
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        return np.concatenate(
            [image, colorize(prediction, self.palette), colorize(example["label"], self.palette)],
            axis=1,
        )


def _programs(graphdef, mesh, layout: canvas.CanvasLayout, num_classes: int):
    """The stitch and score programs (one device's work each, under shard_map) and the zero
    areas; their shapes come from `layout` alone."""
    per_device = PartitionSpec(sharding_lib.BATCH_AXES)
    replicated = PartitionSpec()

    def stitch(params, rest, images, sizes, transposed, window_slot, window_offset, valid):
        model = nnx.merge(graphdef, params, rest)

        def logits_fn(windows):
            return model(windows, train=False)[0].astype(jnp.float32)

        return stitch_windows(
            logits_fn, images[0], sizes[0], transposed[0], window_slot[0], window_offset[0],
            valid[0], window=layout.window, num_classes=num_classes,
        )[None]

    def score(canvases, areas, tile_slot, row_index, row_weight, col_index, col_weight, labels):
        def predict(tile):  # one tile at a time: [t, t, C] logits never exist for all tiles
            return jnp.argmax(resize_tile(canvases[0], *tile), axis=-1).astype(jnp.int32)

        tiles = (tile_slot[0], row_index[0], row_weight[0], col_index[0], col_weight[0])
        predictions = jax.lax.map(predict, tiles, batch_size=min(layout.tiles, 8))
        new = jnp.stack(intersect_and_union(predictions, labels[0], num_classes))
        return areas + new[None], predictions[None]

    stitch = jax.jit(jax.shard_map(
        stitch, mesh=mesh, in_specs=(replicated, replicated) + (per_device,) * 6,
        out_specs=per_device, check_vma=False,
    ))
    score = jax.jit(jax.shard_map(
        score, mesh=mesh, in_specs=(per_device,) * 8, out_specs=(per_device, per_device),
        check_vma=False,
    ), donate_argnums=1)
    zeros = jax.jit(
        lambda: jnp.zeros((mesh.size, 4, num_classes), jnp.int32),
        out_shardings=NamedSharding(mesh, per_device),
    )
    return stitch, score, zeros


def _agree(has_call: bool, score_calls: int, dtype, failed: Exception | None = None
           ) -> tuple[bool, int, Any]:
    """Across processes: whether any has a call left, the most score calls, the image dtype.

    failed: this process's error since the last call; every process then raises (the others
    `ProcessFailedError`), where they used to wait for it in the next collective."""
    from jax.experimental import multihost_utils

    code = {None: 0, np.uint8: 1, np.float32: 2}[dtype]
    status = 0 if failed is None else failure_status(failed)
    mine = np.asarray([has_call, score_calls, code, status], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 4)
    if failed is not None:
        raise failed
    raise_for(everyone[:, 3].tolist(), "evaluating its share of the validation set")
    codes = set(everyone[:, 2].tolist()) - {0}
    if len(codes) > 1:
        raise ValueError("processes disagree on the eval image dtype (uint8 vs float)")
    agreed = {0: np.float32, 1: np.uint8, 2: np.float32}[max(codes, default=0)]
    return bool(everyone[:, 0].max()), int(everyone[:, 1].max()), agreed


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _stack(pictures: list[np.ndarray], *, min_width: int = 768) -> np.ndarray:
    """Pictures of different sizes stacked vertically on a black canvas, small ones (the demo's
    3 x 64 px) enlarged by an integer factor (nearest: labels stay crisp) to be readable."""
    scale = max(1, min_width // max(p.shape[1] for p in pictures))
    pictures = [p.repeat(scale, axis=0).repeat(scale, axis=1) for p in pictures]
    width = max(p.shape[1] for p in pictures)
    rows = [np.pad(p, ((0, 4), (0, width - p.shape[1]), (0, 0))) for p in pictures]
    return np.concatenate(rows, axis=0)
