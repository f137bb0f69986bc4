"""Fixed-shape inputs of the sliding-window evaluation: where each image, window and label tile
goes, so that the compiled programs never depend on the image size (host side, numpy).

Every test-scale image is put in LANDSCAPE orientation (a portrait image and its label are
transposed; the device transposes its windows back before the model sees them) on a canvas of
`height` x `width` = (short, long) side of the test scale, at least the window: ADE20K's
(2048, 512) gives one 512 x 2048 canvas. One device call ("stitch") takes `images` canvases
and `windows` window slots (offsets from each image's REAL size, mmseg's grid); another
("score") takes `tiles` label tiles of `tile` x `tile` pixels at the ORIGINAL label size, each
with the bilinear source rows / columns and weights that resize the stitched logits to it.
Unused slots are masked: a dummy window adds nothing, a dummy tile's label is all 255.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from mae_jax.models.resize import bilinear_matrix
from mae_jax.segmentation.sliding_window import num_windows, window_boxes

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class CanvasLayout:
    """Static shapes of the two evaluation programs, per device and call."""

    height: int  # canvas rows: the short side of the test scale, at least the window
    width: int  # canvas columns: the long side
    window: int  # sliding window side (the model's input)
    stride: int  # sliding window stride
    tile: int  # label tile side (scoring works on tiles of the original-size label)
    images: int  # image canvases per stitch call
    windows: int  # window slots per stitch call
    tiles: int  # label tiles per score call

    def __post_init__(self):
        needed = num_windows(self.height, self.width, window=self.window, stride=self.stride)
        if min(self.window, self.stride, self.tile, self.images, self.tiles) < 1:
            raise ValueError(f"every size of {self} must be >= 1")
        if self.windows < needed:
            raise ValueError(
                f"windows per call ({self.windows}) < {needed}, the windows of a full "
                f"{self.height}x{self.width} canvas: raise windows_per_call to >= {needed}"
            )

    @classmethod
    def for_scale(
        cls, scale: Sequence[int], *, window: int, stride: int, images_per_call: int = 8,
        windows_per_call: int | None = None, tile: int | None = None,
        tiles_per_call: int | None = None,
    ) -> CanvasLayout:
        """The layout for test images resized to fit `scale` = (long, short), any order.

        Defaults: 2 windows per image (ADE20K's usual 683x512 needs 2) but at least a full
        canvas; tiles of min(256, window); 6 tiles per image (a 683x512 label at 256).
        """
        short, long = max(min(scale), window), max(max(scale), window)
        full = num_windows(short, long, window=window, stride=stride)
        tile = tile or min(256, window)
        return cls(
            height=short, width=long, window=window, stride=stride, tile=tile,
            images=images_per_call,
            windows=windows_per_call or max(2 * images_per_call, full),
            tiles=tiles_per_call or 6 * images_per_call,
        )


@dataclasses.dataclass
class Placement:
    """One example in landscape orientation, placed for both programs."""

    index: int  # position in this process's example stream
    example: dict  # the example as given (original orientation)
    image: np.ndarray  # [h, w, 3] test-scale image, h <= w (transposed if portrait)
    label: np.ndarray  # [H, W] original-size label in the same orientation
    transposed: bool
    windows: list[tuple[int, int]]  # canvas (top, left) per window, mmseg's order
    tiles: list[tuple[int, int]]  # (top, left) of each label tile

    # Predicted tiles [tile, tile] by corner, filled only for the examples drawn as pictures.
    predicted: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)

    def prediction(self) -> np.ndarray | None:
        """The predicted class map [H, W] in the ORIGINAL orientation, once every tile is in."""
        if len(self.predicted) < len(self.tiles):
            return None
        full = np.zeros(self.label.shape, np.int32)
        for (top, left), values in self.predicted.items():
            part = full[top:top + values.shape[0], left:left + values.shape[1]]
            part[...] = values[:part.shape[0], :part.shape[1]]
        return full.T if self.transposed else full


def place(example: dict, layout: CanvasLayout, index: int = 0) -> Placement:
    """example {"image": [h, w, 3] float32 (normalised) or uint8 at test scale, "label": [H, W]
    int at the original size} -> its Placement; rejects images that do not fit the canvas."""
    image, label = np.asarray(example["image"]), np.asarray(example["label"])
    if image.ndim != 3 or image.shape[-1] != 3 or label.ndim != 2:
        raise ValueError(
            f"eval example {index}: image {image.shape} must be [h, w, 3] and label "
            f"{label.shape} [H, W]"
        )
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"eval example {index}: image dtype {image.dtype} must be uint8 (0..255) or float "
            "(normalised)"
        )
    height, width = image.shape[:2]
    transposed = height > width
    short, long = (width, height) if transposed else (height, width)
    if short > layout.height or long > layout.width:
        raise ValueError(
            f"eval example {index}: a {height}x{width} test-scale image does not fit the "
            f"{layout.height}x{layout.width} canvas; the eval pipeline must resize images to "
            "fit data.scale (or the evaluator must be built with that scale)"
        )
    boxes = window_boxes(height, width, window=layout.window, stride=layout.stride)
    windows = [(x1, y1) if transposed else (y1, x1) for y1, _, x1, _ in boxes]
    if transposed:
        image, label = image.transpose(1, 0, 2), label.T
    tiles = [(top, left) for top in range(0, label.shape[0], layout.tile)
             for left in range(0, label.shape[1], layout.tile)]
    return Placement(index, example, image, label, transposed, windows, tiles)


def pack(
    examples: Iterable[dict], layout: CanvasLayout, num_devices: int
) -> Iterator[list[list[Placement]]]:
    """Examples -> stitch calls: per device, up to `layout.images` placements whose windows fit
    `layout.windows`, in stream order (device 0 fills first). The last call may be partial."""
    call: list[list[Placement]] = [[]]
    used = 0
    for index, example in enumerate(examples):
        placed = place(example, layout, index)
        if len(call[-1]) == layout.images or used + len(placed.windows) > layout.windows:
            if len(call) == num_devices:
                yield call
                call = []
            call.append([])
            used = 0
        call[-1].append(placed)
        used += len(placed.windows)
    if call[0]:
        yield call + [[] for _ in range(num_devices - len(call))]


def image_dtype(call: list[list[Placement]]) -> type | None:
    """np.uint8 or np.float32: how the call's images travel (None: no image in the call)."""
    kinds = {placed.image.dtype == np.uint8 for placements in call for placed in placements}
    if len(kinds) > 1:
        raise ValueError(
            "eval images mix uint8 and float dtypes; the pipeline must give one or the other"
        )
    return None if not kinds else (np.uint8 if kinds.pop() else np.float32)


def stitch_inputs(call: list[list[Placement]], layout: CanvasLayout, dtype) -> dict:
    """Per-device arrays of one stitch call (leading axis: local devices).

    images [L, B, height, width, 3] (dtype: `image_dtype(call)`, or any for an empty call;
    zero outside each image), sizes [L, B, 2] int32
    (landscape h, w; 0 for empty slots), transposed [L, B] bool, window_slot [L, N] int32,
    window_offset [L, N, 2] int32, window_valid [L, N] bool.
    """
    devices, slots, count = len(call), layout.images, layout.windows
    arrays = {
        "images": np.zeros((devices, slots, layout.height, layout.width, 3), dtype),
        "sizes": np.zeros((devices, slots, 2), np.int32),
        "transposed": np.zeros((devices, slots), bool),
        "window_slot": np.zeros((devices, count), np.int32),
        "window_offset": np.zeros((devices, count, 2), np.int32),
        "window_valid": np.zeros((devices, count), bool),
    }
    for device, placements in enumerate(call):
        window = 0
        for slot, placed in enumerate(placements):
            if (placed.image.dtype == np.uint8) != (np.dtype(dtype) == np.uint8):
                raise ValueError(f"eval example {placed.index}: a {placed.image.dtype} image "
                                 f"in a {np.dtype(dtype)} call (see image_dtype)")
            height, width = placed.image.shape[:2]
            arrays["images"][device, slot, :height, :width] = placed.image
            arrays["sizes"][device, slot] = height, width
            arrays["transposed"][device, slot] = placed.transposed
            for offset in placed.windows:
                arrays["window_slot"][device, window] = slot
                arrays["window_offset"][device, window] = offset
                arrays["window_valid"][device, window] = True
                window += 1
    return arrays


def num_score_calls(call: list[list[Placement]], layout: CanvasLayout) -> int:
    """Score calls one stitch call needs: its busiest device's tiles / tiles per call."""
    tiles = [sum(len(p.tiles) for p in placements) for placements in call]
    return max(math.ceil(t / layout.tiles) for t in tiles) if tiles else 0


def score_inputs(
    call: list[list[Placement]], layout: CanvasLayout, chunk: int
) -> tuple[dict, list[list[tuple[Placement, tuple[int, int]]]]]:
    """Arrays of the `chunk`-th score call of a stitch call, and each device's tile owners.

    tile_slot [L, T] int32 (canvas of the tile), row_index / col_index [L, T, 2, t] int32 (low
    and high source row / column of each output row / column), row_weight / col_weight
    [L, T, 2, t] float32 (their weights; 0 past the label), labels [L, T, t, t] int32 (255 past
    the label and in unused tiles), with T = layout.tiles and t = layout.tile.
    """
    devices, count, size = len(call), layout.tiles, layout.tile
    arrays = {
        "tile_slot": np.zeros((devices, count), np.int32),
        "row_index": np.zeros((devices, count, 2, size), np.int32),
        "row_weight": np.zeros((devices, count, 2, size), np.float32),
        "col_index": np.zeros((devices, count, 2, size), np.int32),
        "col_weight": np.zeros((devices, count, 2, size), np.float32),
        "labels": np.full((devices, count, size, size), IGNORE_INDEX, np.int32),
    }
    owners: list[list[tuple[Placement, tuple[int, int]]]] = []
    for device, placements in enumerate(call):
        tiles = [(slot, placed, corner) for slot, placed in enumerate(placements)
                 for corner in placed.tiles][chunk * count:(chunk + 1) * count]
        owners.append([(placed, corner) for _, placed, corner in tiles])
        tables = {}
        for index, (slot, placed, (top, left)) in enumerate(tiles):
            if placed.index not in tables:
                tables.clear()  # tiles of one placement are consecutive
                tables[placed.index] = [
                    resampling_table(placed.image.shape[axis], placed.label.shape[axis])
                    for axis in (0, 1)
                ]
            rows, cols = tables[placed.index]
            arrays["tile_slot"][device, index] = slot
            for name, table, start in (("row", rows, top), ("col", cols, left)):
                low, high, weights = (part[start:start + size] for part in table)
                arrays[f"{name}_index"][device, index, :, :len(low)] = low, high
                arrays[f"{name}_weight"][device, index, :, :len(low)] = weights.T
            label = placed.label[top:top + size, left:left + size]
            arrays["labels"][device, index, :label.shape[0], :label.shape[1]] = label
    return arrays, owners


def resampling_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear resampling (align_corners False) of one axis as gather tables:
    low [out], high [out] source indices and their weights [out, 2] (float32), taken from the
    same matrix `resize_bilinear` multiplies by, so both paths weigh pixels identically."""
    matrix = bilinear_matrix(in_size, out_size)  # [out, in], 1 or 2 non-zeros per row
    rows = np.arange(out_size)
    low = np.argmax(matrix > 0, axis=1)  # the low weight 1 - frac is never 0
    high = np.minimum(low + 1, in_size - 1)
    high_weight = np.where(high > low, matrix[rows, high], 0.0)
    weights = np.stack([matrix[rows, low], high_weight], axis=1).astype(np.float32)
    return low.astype(np.int32), high.astype(np.int32), weights
