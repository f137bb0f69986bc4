"""Generated segmentation scenes: an offline stand-in for ADE20K in demos and tests.

Each scene is a textured background with a few rectangles, discs and stripe bands painted on top.
Every class has a fixed colour and texture (flat, stripes or checks, with its own period), the
same in every split, so a tiny model can learn them; shapes, sizes, positions, brightness and
noise vary per scene. Labels use ADE20K's RAW format so the same transforms apply:
  0 = "other" (small grey clutter blobs; ignored after label reduction),
  1 = background (reduced class 0), 2..num_classes = object classes (reduced 1..num_classes-1).
Numpy only. Scene i depends only on (seed, i), not on how many scenes are generated.
"""

import colorsys

import numpy as np

OTHER, BACKGROUND = 0, 1
_SHAPES = ("rectangle", "disc", "band")


def check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= 254:
        raise ValueError(
            f"num_classes={num_classes}: synthetic scenes need 2..254 classes (background plus "
            "at least one object class; raw labels must fit uint8 below the ignore value 255)."
        )


def class_appearance(num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed per-class cues for raw labels 1..num_classes (row 0 unused).

    Returns colours [K + 1, 3] float in [0, 255], texture kinds [K + 1] (0 flat, 1 stripes,
    2 checks) and texture periods [K + 1] in pixels.
    """
    colours = np.zeros((num_classes + 1, 3))
    colours[BACKGROUND] = (70.0, 70.0, 80.0)
    for raw in range(2, num_classes + 1):
        # Hues spread round the wheel; alternate value so neighbouring hues differ in lightness.
        hue = (raw - 2) / max(num_classes - 1, 1)
        value = 0.95 if raw % 2 else 0.7
        colours[raw] = 255.0 * np.array(colorsys.hsv_to_rgb(hue, 0.85, value))
    raws = np.arange(num_classes + 1)
    kinds = raws % 3
    periods = 4 + 2 * (raws % 4)
    return colours, kinds, periods


def _texture(kind: int, period: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """[H, W] multiplicative pattern in [0.75, 1.0] for a texture kind."""
    if kind == 1:
        on = ((xs + ys) // period) % 2 == 0
    elif kind == 2:
        on = ((xs // period) + (ys // period)) % 2 == 0
    else:
        return np.ones_like(xs, dtype=np.float64)
    return np.where(on, 1.0, 0.75)


def _shape_mask(kind: str, rng: np.random.Generator, ys, xs, height, width) -> np.ndarray:
    if kind == "rectangle":
        h = rng.integers(height // 6, height // 2 + 1)
        w = rng.integers(width // 6, width // 2 + 1)
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        return (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    if kind == "disc":
        radius = rng.uniform(min(height, width) / 10, min(height, width) / 4)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
    # A straight band across the image at a random angle.
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-0.3, 0.3) * min(height, width)
    half_width = rng.uniform(0.06, 0.15) * min(height, width)
    distance = (xs - width / 2) * np.sin(angle) - (ys - height / 2) * np.cos(angle) - offset
    return np.abs(distance) <= half_width


def generate_scene(
    index: int, *, num_classes: int, image_size=(64, 64), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One scene. Returns image [H, W, 3] uint8 RGB and raw label [H, W] uint8."""
    check_num_classes(num_classes)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    rng = np.random.default_rng([seed, index])
    colours, kinds, periods = class_appearance(num_classes)
    ys, xs = np.mgrid[0:height, 0:width]
    # Textures get a random phase so they are not locked to the image grid.
    tex_ys, tex_xs = ys + rng.integers(0, 16), xs + rng.integers(0, 16)

    label = np.full((height, width), BACKGROUND, np.uint8)
    image = (
        colours[BACKGROUND]
        * _texture(kinds[BACKGROUND], periods[BACKGROUND], tex_ys, tex_xs)[..., None]
    )
    for _ in range(rng.integers(2, 6)):
        raw = rng.integers(2, num_classes + 1)
        shape = _SHAPES[rng.integers(len(_SHAPES))]
        mask = _shape_mask(shape, rng, ys, xs, height, width)
        pattern = colours[raw] * _texture(kinds[raw], periods[raw], tex_ys, tex_xs)[..., None]
        image = np.where(mask[..., None], pattern, image)
        label = np.where(mask, np.uint8(raw), label)
    if rng.random() < 0.5:
        # Unlabelled clutter, as ADE20K's "other": grey noise the model must not be scored on.
        mask = _shape_mask("disc", rng, ys, xs, height, width)
        clutter = rng.uniform(90, 170, size=(height, width, 1))
        image = np.where(mask[..., None], clutter, image)
        label = np.where(mask, np.uint8(OTHER), label)

    image = image * rng.uniform(0.8, 1.2) + rng.normal(0.0, 6.0, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def generate_scenes(
    *, num_classes: int, count: int, image_size=(64, 64), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`count` scenes. Returns images [N, H, W, 3] uint8 and raw labels [N, H, W] uint8
    (0 other, 1 background, 2..num_classes objects)."""
    if count < 1:
        raise ValueError(f"count={count}: ask for at least one scene.")
    scenes = [
        generate_scene(i, num_classes=num_classes, image_size=image_size, seed=seed)
        for i in range(count)
    ]
    return np.stack([s[0] for s in scenes]), np.stack([s[1] for s in scenes])
