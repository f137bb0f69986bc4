"""Reconstruction figures, and the `python -m mae_jax.visualize` command."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import mae_jax
from mae_jax.data.constants import IMAGENET_MEAN, IMAGENET_STD
from mae_jax.visualize import figure_rows, load_images, main, reconstruct

TINY = dict(
    image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_pasted_reconstruction_keeps_visible_patches_and_fills_removed_ones(norm_pix_loss):
    model = mae_jax.MAE(**TINY, norm_pix_loss=norm_pix_loss, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(1), (2, 16))
    parts = reconstruct(model, images, noise=noise, mask_ratio=0.75)
    _, pred, mask = model(images, noise=noise, mask_ratio=0.75)
    removed = np.asarray(model.unpatchify(jnp.broadcast_to(mask[..., None], pred.shape))) > 0.5
    pasted, original = np.asarray(parts["pasted"]), np.asarray(images)
    np.testing.assert_allclose(pasted[~removed], original[~removed], atol=1e-6)
    np.testing.assert_allclose(pasted[removed], np.asarray(parts["reconstruction"])[removed])
    if not norm_pix_loss:  # raw-pixel models predict pixels directly
        np.testing.assert_allclose(
            np.asarray(parts["reconstruction"]), np.asarray(model.unpatchify(pred)), atol=1e-6
        )
    figure = figure_rows(jax.device_get(parts))
    assert figure.dtype == np.uint8 and figure.shape == (2 * 96, 4 * 96, 3)


def test_command_renders_every_image_at_every_mask_ratio(tmp_path, capsys):
    model = mae_jax.MAE(**TINY, rngs=nnx.Rngs(0))
    checkpoint = tmp_path / "mae_visualize_tiny.pth"
    mae_jax.save_official(model, checkpoint)
    paths = []
    for index, mode in enumerate(["RGB", "L", "RGBA"]):
        path = tmp_path / f"image{index}.png"
        Image.new(mode, (40 + 10 * index, 30), color=60 * index).save(path)
        paths.append(str(path))
    out = tmp_path / "figure.png"
    main([
        f"--checkpoint={checkpoint}", f"--images={','.join(paths)}",
        "--mask_ratios=0.5,0.75,0.85", f"--out={out}", "--num_heads=2",
        "--decoder_num_heads=2",
    ])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 9
    with Image.open(out) as figure:
        assert figure.size == (4 * 96, 9 * 96)


def test_command_refuses_missing_files(tmp_path):
    with pytest.raises(SystemExit):
        main([f"--checkpoint={tmp_path}/none.pth", f"--images={tmp_path}/none.png"])


def test_command_names_a_bad_ratio_or_checkpoint_kind_in_one_line(tmp_path, capsys):
    """argparse errors (exit 2, no traceback), before any model is built for a bad ratio."""
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    encoder = tmp_path / "encoder.pth"
    mae_jax.save_official(mae_jax.MAE(**TINY, rngs=nnx.Rngs(0)).encoder, encoder)
    from mae_jax.models.factory import ModelSpec
    from mae_jax.weights.load import save_export

    # A Flax export records its architecture: official-only options are refused for it.
    save_export(mae_jax.MAE(**TINY, rngs=nnx.Rngs(0)), ModelSpec("MAE", TINY),
                str(tmp_path / "run"))
    for flags, message in (
            (["--mask_ratios=abc"], "--mask_ratios=abc: give numbers"),
            (["--mask_ratios=0.5,1.0"], "each must be in (0, 1)"),
            (["--mask_ratios=0"], "each must be in (0, 1)"),  # QA: a traceback, exit 1
            (["--num_heads=2"], "holds a ViTEncoder, not an MAE with its decoder"),
            # Checked before the model runs (they were tracebacks after it, exit 1; QA).
            ([f"--out={tmp_path}/none/figure.png"], "none does not exist"),
            ([f"--out={tmp_path}/figure"], "give an image file name"),
            ([f"--checkpoint={tmp_path}/run", "--norm_pix_loss"],
             "norm_pix_loss only for official checkpoint files")):
        with pytest.raises(SystemExit) as exit_:
            main([f"--checkpoint={encoder}", f"--images={image}", *flags])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    # A truncated image (PIL opens its header, then fails on the pixels) or a text file.
    full = tmp_path / "full.mae.pth"
    mae_jax.save_official(mae_jax.MAE(**TINY, rngs=nnx.Rngs(0)), full)
    truncated, text = tmp_path / "truncated.jpg", tmp_path / "notes.jpg"
    data = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 20, 200)).save(data, format="JPEG")
    truncated.write_bytes(data.getvalue()[:300])
    text.write_text("not an image")
    for bad in (truncated, text):
        with pytest.raises(SystemExit) as exit_:
            main([f"--checkpoint={full}", f"--images={image},{bad}", "--mask_ratios=0.5"])
        assert exit_.value.code == 2
        assert f"--images: image {bad} cannot be read" in capsys.readouterr().err
    # A ratio that keeps no patch of this model is named once the model is known.
    with pytest.raises(SystemExit) as exit_:
        main([f"--checkpoint={full}", f"--images={image}", "--mask_ratios=0.5,0.999"])
    assert exit_.value.code == 2 and "mask_ratio=0.999 keeps no patch" in capsys.readouterr().err


def test_a_16_bit_png_reads_as_the_training_pipeline_reads_it(tmp_path):
    # QA: PIL's convert("RGB") clips 16-bit grey to 255 (a white picture); TensorFlow's
    # decoder, which training uses, keeps the high byte.
    import tensorflow as tf

    from mae_jax.data import image_ops

    wide = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    trained_on = image_ops.decode_rgb(tf.io.read_file(str(path))).numpy()
    shown = load_images([str(path)], (32, 32))[0] * np.asarray(IMAGENET_STD) + np.asarray(
        IMAGENET_MEAN)
    np.testing.assert_allclose(shown * 255, trained_on, atol=1e-3)
    np.testing.assert_array_equal(load_images([str(path)], 32), load_images([str(path)], (32, 32)))
