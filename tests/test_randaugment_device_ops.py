"""RandAugment's device ops (mae_jax.data.randaugment_device, randaugment_pixels) against PIL,
without TensorFlow.

The GPU machine has no TensorFlow, so `benchmarks/gpu_check.sh` runs this file there: the
same ops on the accelerator (where XLA may contract a * b + c into fused multiply-adds and
picks its own kernels) against PIL's own functions. tests/test_randaugment_device.py checks
the host's encoding of timm's ops and the whole pipeline, on the CPU. Tolerances as there:
the integer ops, AutoContrast and the blends exact, the warp (float32 here, float64 in PIL)
at most 1% of the values a level off and 0.5% more (samples on the border taking the fill
colour in one and not the other).
"""

import math

import jax
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mae_jax.data import randaugment_device as device
from mae_jax.data import randaugment_pixels as pixels

FILL = (124, 116, 104)
SIZE = 48


def _image(seed=0):
    """Gradients, a bright square and noise: every op changes it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    image = np.stack([40 + 3 * cols, 200 - 2 * rows, 90 + 40 * np.sin(rows / 4)], -1)
    image[10:20, 25:40] = (230, 40, 60)
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def _rotation(degrees):
    """The matrix PIL's Image.rotate builds (centre (W / 2, H / 2), no expand)."""
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    centre = SIZE / 2.0
    return (cos, sin, cos * -centre + sin * -centre + centre, -sin, cos,
            -sin * -centre + cos * -centre + centre)


def _affine(matrix):
    return lambda pil: pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.BICUBIC,
                                     fillcolor=FILL)


CASES = [  # (code, arguments, PIL reference, exact)
    ("affine", _rotation(17.5), lambda pil: pil.rotate(17.5, resample=Image.BICUBIC,
                                                       fillcolor=FILL), False),
    ("affine", (1, 0.21, 0, 0, 1, 0), _affine((1, 0.21, 0, 0, 1, 0)), False),
    ("affine", (1, 0, 0, -0.3, 1, 0), _affine((1, 0, 0, -0.3, 1, 0)), False),
    ("affine", (1, 0, -7.3, 0, 1, 0), _affine((1, 0, -7.3, 0, 1, 0)), False),
    ("affine", (1, 0, 0, 0, 1, 12.0), _affine((1, 0, 0, 0, 1, 12.0)), False),
    ("autocontrast", (0,), ImageOps.autocontrast, True),
    ("equalize", (0,), ImageOps.equalize, True),
    ("invert", (0,), ImageOps.invert, True),
    ("posterize", (3,), lambda pil: ImageOps.posterize(pil, 3), True),
    ("solarize", (100,), lambda pil: ImageOps.solarize(pil, 100), True),
    ("solarize_add", (60,), lambda pil: pil.point(  # timm's solarize_add LUT
        [min(255, i + 60) if i < 128 else i for i in range(256)] * 3), True),
    ("color", (1.6,), lambda pil: ImageEnhance.Color(pil).enhance(1.6), True),
    ("contrast", (0.4,), lambda pil: ImageEnhance.Contrast(pil).enhance(0.4), True),
    ("brightness", (1.3,), lambda pil: ImageEnhance.Brightness(pil).enhance(1.3), True),
    ("sharpness", (1.8,), lambda pil: ImageEnhance.Sharpness(pil).enhance(1.8), True),
]


def test_device_ops_equal_pils_on_the_default_backend():
    """Each op once, on jax's default device (the GPU in gpu_check.sh), one call."""
    images = np.stack([_image(i) for i in range(len(CASES))])
    codes = np.asarray([[device.CODE[code]] for code, *_ in CASES], np.int32)
    args = np.zeros((len(CASES), 1, device.NUM_ARGS), np.float32)
    for i, (_, values, _, _) in enumerate(CASES):
        args[i, 0, :len(values)] = values
    apply = jax.jit(device.apply_layers, static_argnames="slots")
    ours = np.asarray(apply(images, codes, args, FILL, slots=len(CASES)))
    for out, image, (code, values, reference, exact) in zip(ours, images, CASES, strict=True):
        ref = np.asarray(reference(Image.fromarray(image)))
        assert not np.array_equal(ref, image), code
        diff = np.abs(out.astype(int) - ref.astype(int))
        if exact:
            assert diff.max() == 0, (code, values, np.count_nonzero(diff))
        else:
            assert (diff > 1).mean() <= 5e-3 and (diff == 1).mean() <= 1e-2, (code, values)


def test_statistics_ops_equal_pils_on_a_blown_out_image():
    """Equalize's step leaves out the count of the brightest value: a quarter of the image at
    255 (a blown-out sky) and a dark corner pin it and AutoContrast's range, bit for bit."""
    image = _image(3)
    image[:24, :24] = 255
    image[40:, 40:, 1] = 7
    for name, reference in (("equalize", ImageOps.equalize),
                            ("autocontrast", ImageOps.autocontrast)):
        ours = jax.jit(lambda im, c: pixels.lookup(im, pixels.statistics_lut(im, c)))(
            image, device.CODE[name])
        want = np.asarray(reference(Image.fromarray(image)))
        assert not np.array_equal(want, image)
        np.testing.assert_array_equal(np.asarray(ours), want, err_msg=name)


def test_autocontrast_tables_equal_pils_for_every_min_and_max():
    """All 32,640 (min, max) pairs: the table of ImageOps.autocontrast (float64 in PIL, e.g.
    min 0, max 25 maps 25 to 254) on the values min .. max, bit for bit. Both stretch each
    band by its own min and max: 3 pairs an image, one in each band."""
    lo, hi = (a.reshape(-1, 3) for a in np.triu_indices(256, 1))  # [10880, 3] each
    images = np.stack([lo, hi], 1)[:, None].astype(np.uint8)  # [N, 1, 2, 3]: min, max pixels
    code = device.CODE["autocontrast"]
    tables = np.asarray(jax.jit(jax.vmap(lambda im: pixels.statistics_lut(im, code)))(images))
    rows = np.minimum(lo[..., None] + np.arange(256), hi[..., None])  # min .. max, then max
    want = np.stack([np.asarray(ImageOps.autocontrast(Image.fromarray(
        row.T[None].astype(np.uint8))))[0].T for row in rows])  # [N, 3, 256]
    wrong = np.argwhere((np.take_along_axis(tables, rows, 2) != want).any(2))
    assert wrong.size == 0, [(int(lo[i, b]), int(hi[i, b])) for i, b in wrong[:5]]  # (min, max)


def test_shears_and_translations_take_the_warps_bits_from_a_quarter_of_its_taps():
    """`shift` (4 taps along the one axis pixels move on) == `warp` (PIL's 16 taps: its cubic at
    a zero fraction returns the sample), on the default backend."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 37, 53, 3), dtype=np.uint8)
    matrices = np.tile(np.asarray(device.IDENTITY_MATRIX, np.float32), (24, 1))
    for i, entry in enumerate(np.arange(24) % 4):  # b, d: shears; c, f: translations
        matrices[i, (1, 3, 2, 5)[entry]] = rng.uniform(-0.3, 0.3) if entry < 2 else \
            rng.uniform(-40, 40)
    fill = np.asarray(FILL, np.float32)
    shifted = jax.jit(jax.vmap(lambda im, m: device.shift(im, m, fill)))(images, matrices)
    warped = jax.jit(jax.vmap(lambda im, m: device.warp(im, m, fill)))(images, matrices)
    np.testing.assert_array_equal(shifted, warped)
    assert not np.array_equal(shifted, images)
