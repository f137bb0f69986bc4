"""Labelled procedural images for the offline classification demos and tests: no download.

The label is the *texture* covering the image: stripes (vertical, horizontal), checkerboards
(upright, diagonal), dots, rings, grid lines, cross-hatching. Its two grey levels, period, phase
and the pixel noise are random, so intensity statistics do not give the class: an encoder has to
represent local structure, which is what masked reconstruction teaches it (most directly with
norm_pix_loss). Grey, not coloured: with random colours a small encoder's features are dominated
by colour for thousands of steps, and a short CPU run shows nothing. Every texture is symmetric
under a horizontal flip, so the flip augmentation never changes a label.

`generated:N` sources become `folder:<workdir>/generated_classes` with N training images and
N // 4 validation images, in the `PATH/train/<class>/`, `PATH/val/<class>/` layout the folder
source reads.
"""

from __future__ import annotations

import os

import numpy as np

from mae_jax.classification.textures import TEXTURES, TRAIN_SPLIT, VAL_SPLIT
from mae_jax.data.generated import clear_generated, generated_count


def _pattern(kind: str, rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator):
    """Values in [-1, 1] of one texture; rows / cols in pixels."""
    frequency = 2 * np.pi / rng.uniform(3.0, 6.0)  # a period of 3-6 pixels
    phase_a, phase_b = rng.uniform(0, 2 * np.pi, 2)
    diagonal_a, diagonal_b = (cols + rows) / np.sqrt(2), (cols - rows) / np.sqrt(2)
    wave_cols, wave_rows = np.cos(frequency * cols + phase_a), np.cos(frequency * rows + phase_b)
    if kind == "vertical_stripes":
        return wave_cols
    if kind == "horizontal_stripes":
        return wave_rows
    if kind == "checkerboard":
        return np.sign(wave_cols * wave_rows)
    if kind == "diagonal_checkerboard":
        return np.sign(np.cos(frequency * diagonal_a + phase_a)
                       * np.cos(frequency * diagonal_b + phase_b))
    if kind == "dots":
        return np.where((wave_cols > 0.3) & (wave_rows > 0.3), 1.0, -1.0)
    if kind == "rings":
        centre = rng.uniform(0, rows.shape[0], 2)
        return np.cos(frequency * np.hypot(rows - centre[0], cols - centre[1]) + phase_a)
    if kind == "grid":
        return np.where((wave_cols > 0.7) | (wave_rows > 0.7), 1.0, -1.0)
    if kind == "crosshatch":
        lines = ((np.cos(frequency * diagonal_a + phase_a) > 0.7)
                 | (np.cos(frequency * diagonal_b + phase_b) > 0.7))
        return np.where(lines, 1.0, -1.0)
    raise ValueError(f"unknown texture {kind!r}")


def generate_labelled_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: texture `label` between two random grey levels, pixel noise."""
    if not 0 <= label < len(TEXTURES):
        raise ValueError(f"label {label} out of range: {len(TEXTURES)} textures are defined.")
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    blend = (_pattern(TEXTURES[label], rows, cols, rng) + 1) / 2
    first, second = rng.uniform(0, 255, 2)
    image = first + (second - first) * blend[..., None] + rng.normal(0, 8, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_labelled_dataset(
    folder: str, *, num_train: int, num_val: int, num_classes: int = 10, size: int = 32,
    seed: int = 0,
) -> str:
    """Writes PNGs to folder/{train,val}/class_XX/ once (kept if complete); returns folder.

    Classes are balanced (image i has label i % num_classes).
    """
    from PIL import Image

    if not 2 <= num_classes <= len(TEXTURES):
        raise ValueError(f"num_classes must be in [2, {len(TEXTURES)}], got {num_classes}.")
    if num_train < num_classes or num_val < 1:
        raise ValueError(
            f"need at least one training image per class ({num_classes}) and one validation "
            f"image, got {num_train} / {num_val}."
        )
    marker = os.path.join(folder, f".complete_{num_train}_{num_val}_{num_classes}_{size}_{seed}")
    if os.path.exists(marker):
        return folder
    clear_generated(folder)  # fewer images or classes than an earlier run's
    for split, count, split_seed in ((TRAIN_SPLIT, num_train, seed), (VAL_SPLIT, num_val,
                                                                      seed + 1)):
        rng = np.random.default_rng([split_seed, 7])
        for label in range(num_classes):
            os.makedirs(os.path.join(folder, split, f"class_{label:02d}"), exist_ok=True)
        for index in range(count):
            label = index % num_classes
            path = os.path.join(folder, split, f"class_{label:02d}", f"{index:06d}.png")
            Image.fromarray(generate_labelled_image(rng, label, size)).save(path)
    open(marker, "w").close()
    return folder


def resolve_labelled_source(data_config, workdir: str, *, seed: int) -> str:
    """`generated:N` -> a folder of N labelled training (and N // 4 validation) images in
    `workdir`; any other source string as it is."""
    count = generated_count(data_config.source)
    if count is None:
        return data_config.source
    for split in (data_config.train_split, data_config.eval_split):
        if split not in (TRAIN_SPLIT, VAL_SPLIT, "validation"):  # validation: PATH/val too
            raise ValueError(
                f"generated data has the splits {TRAIN_SPLIT!r} and {VAL_SPLIT!r}, not {split!r}: "
                "set data.train_split / data.eval_split."
            )
    folder = os.path.join(workdir, "generated_classes")
    write_labelled_dataset(
        folder, num_train=count, num_val=max(count // 4, 1),
        num_classes=data_config.generated_classes, size=data_config.generated_size, seed=seed,
    )
    return f"folder:{folder}"
