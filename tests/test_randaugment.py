"""RandAugment (mae_jax.data.randaugment and its ops) against PIL and timm 0.3.2's RandAugment.

timm's ops are thin wrappers around PIL, so every op is compared with the PIL call timm makes, on
generated uint8 images. Tolerances: pixel ops must match exactly (PIL's integer LUTs and float32
blends are reproduced operation by operation). Geometric ops (PIL's bicubic affine transform,
computed in float64 in both) are allowed an off-by-one on at most 0.1% of the values, because
TensorFlow's sin / cos may differ from the C library's by an ulp, which can flip the truncation
to uint8 of a value lying within ~1e-12 of an integer; in practice they are identical here.
The level -> argument mappings and magnitude sampling are checked against timm's formulas,
written out below.
"""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from mae_jax.data import augment_affine as geometry
from mae_jax.data import augment_levels as levels
from mae_jax.data import augment_ops as ops
from mae_jax.data import randaugment as ra

FILL = (124, 116, 104)


# ----------------------------------------------------------------------------- test images


def _scene(height, width, seed):
    """A 'real-ish' image: gradients, a disc, a bar, stripes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack(
        [
            40 + 150 * xx / width + 30 * np.sin(yy / 5.0),
            90 + 100 * yy / height,
            200 - 120 * (xx + yy) / (width + height),
        ],
        -1,
    )
    disc = (yy - 0.4 * height) ** 2 + (xx - 0.6 * width) ** 2 < (0.25 * min(height, width)) ** 2
    img[disc] = (230, 40, 60)
    img[int(0.7 * height) : int(0.8 * height), 3:-3] = (20, 20, 240)
    img[:, ::7] *= 0.8
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _odd_channels(height=19, width=23):
    """Constant channel 0, a two-valued channel 1 (equalize's step == 0), random channel 2."""
    rng = np.random.default_rng(7)
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = 77
    img[..., 1] = 200
    img[0, :5, 1] = 10
    img[..., 2] = rng.integers(30, 180, (height, width))
    return img


IMAGES = [_scene(37, 53, 0), _scene(48, 40, 1), _odd_channels(), _scene(37, 53, 2) // 3 + 60]
SMALL = IMAGES[:2]


def _pil(img):
    return Image.fromarray(img)


def posterize_lut(bits):
    """ImageOps.posterize's LUT: keep the top ``bits`` bits (bits=0 -> all zero)."""
    return np.array([i & ~(2 ** (8 - bits) - 1) for i in range(256)], np.uint8)


def assert_exact(ours, ref):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def assert_geometric_close(ours, ref):
    diff = np.abs(np.asarray(ours).astype(int) - np.asarray(ref).astype(int))
    assert diff.max() <= 1, f"max |diff| {diff.max()}"
    assert np.count_nonzero(diff) <= 1e-3 * diff.size, f"{np.count_nonzero(diff)} values differ"


# ----------------------------------------------------------------------------- pixel ops


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_autocontrast_equalize_and_invert_equal_pil_imageops_exactly(index):
    img = IMAGES[index]
    assert_exact(ops.autocontrast(img), ImageOps.autocontrast(_pil(img)))
    assert_exact(ops.equalize(img), ImageOps.equalize(_pil(img)))
    assert_exact(ops.invert(img), ImageOps.invert(_pil(img)))


def test_posterize_equals_pil_for_1_to_8_bits_and_keeps_no_bits_at_0():
    img = IMAGES[0]
    for bits in range(0, 9):
        # The LUT of ImageOps.posterize; Pillow >= 10 refuses bits=0, older Pillow (timm 0.3.2's
        # era) applied this same LUT, i.e. a black image. timm reaches 0 bits at magnitude 10.
        assert_exact(ops.posterize(img, bits), posterize_lut(bits)[img])
        if bits >= 1:
            assert_exact(ops.posterize(img, bits), ImageOps.posterize(_pil(img), bits))


def test_solarize_equals_pil_and_solarize_add_equals_timms_lut():
    img = IMAGES[0]
    for threshold in (0, 1, 77, 128, 200, 256):
        assert_exact(ops.solarize(img, threshold), ImageOps.solarize(_pil(img), threshold))
    for add in (0, 33, 110):
        # timm solarize_add: lut[i] = min(255, i + add) if i < 128 else i, via img.point.
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        assert_exact(ops.solarize_add(img, add), _pil(img).point(lut * 3))


@pytest.mark.parametrize("factor", [0.1, 0.37, 1.0, 1.55, 1.9])
def test_color_contrast_brightness_and_sharpness_equal_pil_imageenhance_exactly(factor):
    for img in IMAGES:
        pil = _pil(img)
        assert_exact(ops.color(img, factor), ImageEnhance.Color(pil).enhance(factor))
        assert_exact(ops.contrast(img, factor), ImageEnhance.Contrast(pil).enhance(factor))
        assert_exact(ops.brightness(img, factor), ImageEnhance.Brightness(pil).enhance(factor))
        assert_exact(ops.sharpness(img, factor), ImageEnhance.Sharpness(pil).enhance(factor))


# ----------------------------------------------------------------------------- geometric ops


def _pil_affine(img, matrix):
    return _pil(img).transform(
        (img.shape[1], img.shape[0]), Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL
    )


@pytest.mark.parametrize("degrees", [-30.0, -12.25, 0.0, 4.5, 27.0])
def test_rotate_matches_pil_bicubic_rotate_with_fill(degrees):
    for img in SMALL:
        ref = _pil(img).rotate(degrees, resample=Image.BICUBIC, fillcolor=FILL)
        assert_geometric_close(geometry.rotate(img, degrees, FILL), ref)


@pytest.mark.parametrize("factor", [-0.3, -0.117, 0.05, 0.3])
def test_shear_x_and_shear_y_match_pil_bicubic_affine_with_fill(factor):
    for img in SMALL:
        ref_x = _pil_affine(img, (1, factor, 0, 0, 1, 0))
        assert_geometric_close(geometry.shear_x(img, factor, FILL), ref_x)
        ref_y = _pil_affine(img, (1, 0, 0, factor, 1, 0))
        assert_geometric_close(geometry.shear_y(img, factor, FILL), ref_y)


@pytest.mark.parametrize("pixels", [-23.85, -4.0, 0.5, 11.34, 52.0])
def test_translate_x_and_translate_y_match_pil_bicubic_affine_with_fill(pixels):
    for img in SMALL:
        ours_x = geometry.translate_x(img, pixels, FILL)
        assert_geometric_close(ours_x, _pil_affine(img, (1, 0, pixels, 0, 1, 0)))
        ours_y = geometry.translate_y(img, pixels, FILL)
        assert_geometric_close(ours_y, _pil_affine(img, (1, 0, 0, 0, 1, pixels)))


@pytest.mark.parametrize("matrix", [
    (1.0, 0.0, 7.3, 0.0, 1.0, 0.0), (1.0, -0.117, 13.1, 0.0, 1.0, 0.0),  # translate / shear x
    (1.0, 0.0, 0.0, 0.0, 1.0, -4.61), (1.0, 0.0, 0.0, 0.3, 1.0, -9.9),  # translate / shear y
    (1.0, 0.0, -3.0, 0.0, 1.0, 0.0),  # a whole-pixel shift
    tuple(float(v) for v in geometry.rotation_matrix(17.3, 48, 40)),  # Rotate: 16 taps
])
def test_one_axis_warps_take_4_taps_and_give_the_16_tap_bits(matrix):
    """`affine` reads 4 taps along the one axis a shear / translation moves, in one XLA
    program: the same bits as TensorFlow's op-by-op 16-tap warp (the other axis's offset is 0,
    where PIL's cubic returns its sample)."""
    image = tf.constant(IMAGES[1])
    a = tf.unstack(tf.constant(matrix, tf.float64))
    full = geometry._warp(image, a, geometry.DEFAULT_FILL, taps_x=True, taps_y=True)
    np.testing.assert_array_equal(geometry.affine(image, matrix).numpy(), full.numpy())


def test_geometric_fill_is_timms_imagenet_mean_colour():
    assert geometry.fill_from_mean() == FILL == geometry.DEFAULT_FILL
    out = np.asarray(geometry.translate_x(IMAGES[0], 100.0))  # everything shifted out
    assert (out == np.array(FILL, np.uint8)).all()


# ----------------------------------------------------------------------------- timm written out


def timm_level_to_arg(name, level, negate, width, height):
    """timm 0.3.2 LEVEL_TO_ARG for the RandAugment ops (negate = _randomly_negate's outcome)."""
    sign = -1.0 if negate else 1.0
    if name == "Rotate":
        return (sign * ((level / 10.0) * 30.0),)
    if name in ("ShearX", "ShearY"):
        return (sign * ((level / 10.0) * 0.3),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * ((level / 10.0) * 0.45),)
    if name in ("TranslateX", "TranslateY"):  # translate_const = int(224 * 0.45) = 100
        return (sign * ((level / 10.0) * float(100)),)
    if name == "Posterize":
        return (int((level / 10.0) * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int((level / 10.0) * 4),)
    if name == "Solarize":
        return (int((level / 10.0) * 256),)
    if name == "SolarizeIncreasing":
        return (256 - int((level / 10.0) * 256),)
    if name == "SolarizeAdd":
        return (int((level / 10.0) * 110),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return ((level / 10.0) * 1.8 + 0.1,)
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness Increasing
        return (1.0 + sign * ((level / 10.0) * 0.9),)
    return ()


def timm_op(img, name, args):
    """timm 0.3.2 NAME_TO_OP with hparams interpolation=bicubic, img_mean=FILL."""
    pil = _pil(img)
    kw = dict(resample=Image.BICUBIC, fillcolor=FILL)
    w, h = pil.size
    base = name.replace("Increasing", "")
    if base == "AutoContrast":
        out = ImageOps.autocontrast(pil)
    elif base == "Equalize":
        out = ImageOps.equalize(pil)
    elif base == "Invert":
        out = ImageOps.invert(pil)
    elif base == "Rotate":
        out = pil.rotate(args[0], **kw)
    elif base == "Posterize":
        bits = args[0]
        out = pil if bits >= 8 else _pil(posterize_lut(bits)[img])  # bits=0: old-Pillow black
    elif base == "Solarize":
        out = ImageOps.solarize(pil, args[0])
    elif base == "SolarizeAdd":
        out = pil.point([min(255, i + args[0]) if i < 128 else i for i in range(256)] * 3)
    elif base in ("Color", "Contrast", "Brightness", "Sharpness"):
        out = getattr(ImageEnhance, base)(pil).enhance(args[0])
    elif base == "ShearX":
        out = pil.transform(pil.size, Image.AFFINE, (1, args[0], 0, 0, 1, 0), **kw)
    elif base == "ShearY":
        out = pil.transform(pil.size, Image.AFFINE, (1, 0, 0, args[0], 1, 0), **kw)
    elif base == "TranslateXRel":
        out = pil.transform(pil.size, Image.AFFINE, (1, 0, args[0] * w, 0, 1, 0), **kw)
    elif base == "TranslateYRel":
        out = pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, args[0] * h), **kw)
    else:
        raise AssertionError(name)
    return np.asarray(out)


LEVEL_FUNCTIONS = {
    "Rotate": lambda lv, ng: levels.rotate_level_to_arg(lv, ng),
    "ShearX": lambda lv, ng: levels.shear_level_to_arg(lv, ng),
    "TranslateXRel": lambda lv, ng: levels.translate_rel_level_to_arg(lv, ng),
    "TranslateX": lambda lv, ng: levels.translate_abs_level_to_arg(lv, ng, 100),
    "Posterize": lambda lv, ng: levels.posterize_level_to_arg(lv),
    "PosterizeIncreasing": lambda lv, ng: levels.posterize_increasing_level_to_arg(lv),
    "Solarize": lambda lv, ng: levels.solarize_level_to_arg(lv),
    "SolarizeIncreasing": lambda lv, ng: levels.solarize_increasing_level_to_arg(lv),
    "SolarizeAdd": lambda lv, ng: levels.solarize_add_level_to_arg(lv),
    "Color": lambda lv, ng: levels.enhance_level_to_arg(lv),
    "ColorIncreasing": lambda lv, ng: levels.enhance_increasing_level_to_arg(lv, ng),
}


@pytest.mark.parametrize("name", sorted(LEVEL_FUNCTIONS))
def test_level_to_arg_mappings_equal_timms_formulas(name):
    for level in (0.0, 0.3, 2.5, 4.99, 5.0, 7.5, 8.76, 9.0, 9.99, 10.0):
        for negate in (False, True):
            got = float(LEVEL_FUNCTIONS[name](level, negate))
            (want,) = timm_level_to_arg(name, level, negate, 0, 0)
            assert got == pytest.approx(want, abs=1e-12), (level, negate)


@pytest.mark.parametrize("name", sorted(set(ra.RAND_OPS) | set(ra.RAND_INCREASING_OPS)))
def test_apply_op_equals_timms_augment_op_by_name(name):
    img = IMAGES[1]
    for level, negate in ((7.3, False), (2.15, True)):
        args = timm_level_to_arg(name, level, negate, *img.shape[1::-1])
        ours = ra.apply_op(img, name, level, negate, fill=FILL)
        assert_geometric_close(ours, timm_op(img, name, args))


def test_magnitudes_are_gauss_9_std_0_5_clipped_to_10_and_choices_are_uniform():
    n = 20000  # sample_layers draws each layer independently: one call gives n draws
    p = ra.sample_layers(tf.constant([3, 4]), num_ops=15, num_layers=n)
    op, apply = p["op_index"].numpy(), p["apply"].numpy()
    mag, negate = p["magnitude"].numpy(), p["negate"].numpy()
    counts = np.bincount(op, minlength=15)
    assert counts.size == 15 and np.all(np.abs(counts / n - 1 / 15) < 5 * np.sqrt(1 / 15 / n))
    assert abs(apply.mean() - 0.5) < 0.02 and abs(negate.mean() - 0.5) < 0.02
    # timm: magnitude = min(10, max(0, random.gauss(9, 0.5))), written out with numpy.
    ref = np.clip(np.random.default_rng(0).normal(9.0, 0.5, n), 0, 10)
    assert mag.min() >= 0 and mag.max() == 10.0
    assert abs(mag.mean() - ref.mean()) < 0.02 and abs(mag.std() - ref.std()) < 0.02
    assert abs((mag == 10).mean() - 0.02275) < 0.006  # P(gauss > 10) = P(z > 2)
    fixed = ra.sample_layers(tf.constant([3, 4]), num_ops=15, num_layers=50, magnitude_std=0)
    assert (fixed["magnitude"].numpy() == 9.0).all()


# ----------------------------------------------------------------------------- full transform


_augment = tf.function(ra.rand_augment)


def test_rand_augment_equals_timm_replayed_with_pil_for_the_same_draws():
    """Every op of the 'inc1' list is hit; each image is compared with timm's ops (PIL)."""
    img = IMAGES[0]
    names = ra.op_names(increasing=True)
    assert len(names) == 15
    seen = set()
    for s in range(400):
        seed = tf.constant([s, 17])
        p = {k: v.numpy() for k, v in ra.sample_layers(seed, num_ops=15).items()}
        new = {names[i] for i, a in zip(p["op_index"], p["apply"], strict=True) if a} - seen
        if not new and s % 10:  # replay seeds that add an op, plus every 10th seed
            continue
        seen |= new
        ref = img
        for i, a, lv, ng in zip(p["op_index"], p["apply"], p["magnitude"], p["negate"],
                                strict=True):
            if a:
                name = names[i]
                ref = timm_op(ref, name, timm_level_to_arg(name, lv, ng, *img.shape[1::-1]))
        assert_geometric_close(_augment(tf.constant(img), seed), ref)
        if len(seen) == 15 and s >= 60:
            break
    assert seen == set(names)


def test_same_seed_gives_the_same_image_and_different_seeds_differ():
    img = tf.constant(IMAGES[0])  # same shape as the replay test: reuses its trace
    a = _augment(img, tf.constant([5, 6])).numpy()
    b = _augment(img, tf.constant([5, 6])).numpy()
    np.testing.assert_array_equal(a, b)
    outs = [_augment(img, tf.constant([s, 6])).numpy() for s in range(8)]
    distinct = {o.tobytes() for o in outs}
    assert len(distinct) >= 5  # identical only when both layers are skipped / idempotent


def test_rand_augment_runs_in_a_parallel_tf_data_map_like_eager():
    images = np.stack([_scene(37, 53, k) for k in range(6)])
    seeds = np.stack([np.arange(6), np.full(6, 3)], 1)
    ds = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
        ra.rand_augment, num_parallel_calls=2, deterministic=True
    )
    for (img, seed), out in zip(zip(images, seeds, strict=True), ds, strict=True):
        assert out.dtype == tf.uint8 and out.shape == (37, 53, 3)
        np.testing.assert_array_equal(out.numpy(), ra.rand_augment(img, seed).numpy())


def test_parse_rand_augment_reads_the_official_string_and_rejects_others():
    cfg = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert cfg == dict(num_layers=2, magnitude=9, magnitude_std=0.5, increasing=True)
    assert ra.parse_rand_augment("rand-n3-m7") == dict(
        num_layers=3, magnitude=7, magnitude_std=0.0, increasing=False
    )
    for bad in ("augmix-m5", "original-mstd0.5", "rand-m9-w0", "rand-x3", "rand-m", "rand-m9.5",
                "", "rand-m9-inc"):
        with pytest.raises(ValueError):
            ra.parse_rand_augment(bad)
    out = ra.rand_augment(IMAGES[0], tf.constant([1, 2]), **cfg)
    assert out.shape == IMAGES[0].shape and out.dtype == tf.uint8
