"""Procedural images for the offline demo: no download, deterministic, learnable structure.

Each image is a smooth colour gradient with a few discs, rectangles and stripes: enough local
structure that a tiny MAE learns to fill in masked patches within minutes on a CPU.
"""

from __future__ import annotations

import os
import re

import numpy as np


def generate_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [size, size, 3]."""
    rows, cols = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * cols + np.sin(angle) * rows + 1.5) / 3.0
    image = start + (end - start) * t[..., None]
    for _ in range(rng.integers(2, 5)):
        colour = rng.uniform(0, 255, 3)
        kind = rng.integers(0, 3)
        cy, cx = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.1, 0.35)
        if kind == 0:  # disc
            inside = (rows - cy) ** 2 + (cols - cx) ** 2 < radius**2
        elif kind == 1:  # rectangle
            inside = (np.abs(rows - cy) < radius) & (np.abs(cols - cx) < radius * 0.7)
        else:  # stripes inside a band
            period = rng.uniform(0.08, 0.2)
            inside = (np.abs(rows - cy) < radius) & ((cols / period) % 1.0 < 0.5)
        image[inside] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def clear_generated(folder: str) -> None:
    """Removes what an earlier `generated:N` of other settings wrote into `folder` (its PNGs,
    class folders and markers), so a smaller N is not read together with the earlier extra
    images. Other files are left alone."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            if re.fullmatch(r"\d{6}\.png|\.complete_[\d_]+", name):
                os.remove(os.path.join(root, name))
        for name in dirs:  # class folders left empty
            if not os.listdir(os.path.join(root, name)):
                os.rmdir(os.path.join(root, name))


def write_generated_images(folder: str, *, count: int, size: int = 64, seed: int = 0) -> str:
    """Writes `count` PNGs into `folder` once (kept if already complete); returns the folder."""
    from PIL import Image

    if count < 1:
        raise ValueError(f"generated image count must be >= 1, got {count}.")
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f".complete_{count}_{size}_{seed}")
    if os.path.exists(marker):
        return folder
    clear_generated(folder)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(generate_image(rng, size)).save(os.path.join(folder, f"{index:06d}.png"))
    open(marker, "w").close()
    return folder


def generated_count(source: str) -> int | None:
    """N of a `generated:N` source (a clear error for a bad N); None for any other source."""
    if not source.startswith("generated:"):
        return None
    count = source.split(":", 1)[1]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"data.source {source!r}: use generated:N with N >= 1 images.")
    return int(count)


def resolve_source(data_config, workdir: str, *, seed: int) -> str:
    """`generated:N` (the demo's offline data) -> a folder of N generated images in workdir;
    any other source string as it is."""
    count = generated_count(data_config.source)
    if count is None:
        return data_config.source
    folder = os.path.join(workdir, "generated_images")
    write_generated_images(folder, count=count, size=data_config.get("generated_size", 64),
                           seed=seed)
    return f"folder:{folder}"
