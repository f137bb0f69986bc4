"""MAE behaviour a user relies on: masking, loss, gradients, variants, errors."""

import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import mae_jax
from mae_jax.models.mae import (
    num_visible,
    random_masking,
    reconstruction_loss,
    removed_patches,
)
from mae_jax.reference.torch_mae import build_mae, count_params

TINY = dict(
    image_size=32,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)


def tiny_mae(**overrides):
    return mae_jax.MAE(**(TINY | overrides), rngs=nnx.Rngs(0))


def test_masking_keeps_the_official_number_of_patches_and_inverts_the_shuffle():
    tokens = jnp.arange(4 * 50 * 3, dtype=jnp.float32).reshape(4, 50, 3)
    noise = jax.random.uniform(jax.random.key(0), (4, 50))
    kept, mask, ids_restore = random_masking(tokens, noise, 0.75)
    assert kept.shape == (4, int(50 * 0.25), 3)
    np.testing.assert_array_equal(np.asarray(mask.sum(axis=1)), [50 - 12] * 4)
    ids_shuffle = np.argsort(np.asarray(noise), axis=1)
    np.testing.assert_array_equal(
        np.take_along_axis(ids_shuffle, np.asarray(ids_restore), axis=1),
        np.tile(np.arange(50), (4, 1)),
    )
    # Kept tokens are the lowest-noise ones, and the mask marks exactly the others.
    np.testing.assert_array_equal(
        np.asarray(kept), np.take_along_axis(np.asarray(tokens), ids_shuffle[:, :12, None], 1)
    )
    assert len({tuple(row) for row in np.asarray(mask)}) == 4  # one mask per sample


def test_rng_masks_differ_across_samples_and_are_reproducible():
    model = tiny_mae()
    images = jnp.ones((3, 32, 32, 3))
    _, _, mask_a = model(images, rng=jax.random.key(1))
    _, _, mask_b = model(images, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(mask_a), np.asarray(mask_b))
    assert len({tuple(row) for row in np.asarray(mask_a)}) == 3
    assert num_visible(16, 0.75) == int(np.asarray(1 - mask_a[0]).sum())


def test_loss_ignores_visible_patches():
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.normal(size=(2, 16, 12)), jnp.float32)
    pred = jnp.asarray(rng.normal(size=(2, 16, 12)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(2, 16)) < 0.75, jnp.float32)
    for norm_pix in (False, True):
        base = reconstruction_loss(target, pred, mask, norm_pix_loss=norm_pix)
        changed = jnp.where(mask[..., None] == 0, pred + 100.0, pred)
        assert float(reconstruction_loss(target, changed, mask, norm_pix_loss=norm_pix)) == (
            pytest.approx(float(base), abs=1e-6)
        )
        changed_masked = jnp.where(mask[..., None] == 1, pred + 1.0, pred)
        assert float(reconstruction_loss(target, changed_masked, mask, norm_pix_loss=norm_pix)) > (
            float(base)
        )


@pytest.mark.parametrize("norm_pix_loss, decoder_depth", [(False, 2), (True, 1), (True, 0)])
def test_training_loss_computes_only_the_removed_rows_and_equals_the_full_forward(
        norm_pix_loss, decoder_depth):
    """`MAE.loss` (what train.py optimises): the decoder's last block and head on the removed
    patches alone give the full forward's loss and gradients (the full forward is pinned to
    the official model by test_mae_parity), to float32 rounding."""
    model = tiny_mae(norm_pix_loss=norm_pix_loss, decoder_depth=decoder_depth)
    images = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(3), (3, 16))
    graphdef, params = nnx.split(model)

    # Jitted: one compile per side (op by op, each primitive compiles alone: 2-3x the time).
    fast, fast_grads = jax.jit(jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p).loss(images, noise=noise)))(params)
    full, full_grads = jax.jit(jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p)(images, noise=noise)[0]))(params)
    assert float(fast) == pytest.approx(float(full), rel=1e-6)
    for got, want in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    # The last block's rows: the removed patches only (a visible patch's prediction would
    # need the rows this skips).
    removed = np.asarray(removed_patches(noise, 0.75))
    _, _, mask = model(images, noise=noise)
    assert removed.shape == (3, 12) and np.all(np.take_along_axis(np.asarray(mask), removed, 1))
    with pytest.raises(ValueError, match="exactly one"):
        model.loss(images)


def test_no_gradient_reaches_masked_pixels_through_the_encoder():
    model = tiny_mae()
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(3), (2, 16))

    def encoder_output(images):
        latent, _, _ = model.forward_encoder(images, noise, 0.75)
        return jnp.sum(latent**2)

    grads = model.patchify(jax.grad(encoder_output)(images))
    _, mask, _ = model.forward_encoder(images, noise, 0.75)
    per_patch = np.abs(np.asarray(grads)).sum(axis=-1)
    removed = np.asarray(mask) == 1
    assert np.all(per_patch[removed] == 0)
    assert np.all(per_patch[~removed] > 0)


def test_bfloat16_compute_keeps_float32_parameters_and_close_loss():
    images = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(5), (2, 16))
    loss32, _, _ = tiny_mae()(images, noise=noise)
    model16 = tiny_mae(dtype=jnp.bfloat16)
    params = nnx.state(model16, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    loss16, pred16, _ = model16(images, noise=noise)
    assert pred16.dtype == jnp.bfloat16 and loss16.dtype == jnp.float32
    assert float(loss16) == pytest.approx(float(loss32), rel=0.01)


def test_unpatchify_inverts_patchify_on_a_non_square_image():
    images = jax.random.normal(jax.random.key(6), (2, 16, 24, 3))
    patches = mae_jax.patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    np.testing.assert_array_equal(mae_jax.unpatchify(patches, 8, (2, 3)), images)


# Official parameter counts (trainable, i.e. without the fixed sin-cos tables) at 224.
OFFICIAL_COUNTS = {
    "vit_tiny_patch16": (5_486_592, 31_200_000),
    "vit_small_patch16": (21_590_016, 47_401_728),
    "vit_base_patch16": (85_647_360, 111_655_680),
    "vit_large_patch16": (303_099_904, 329_239_296),
    "vit_huge_patch14": (630_435_840, 656_613_964),
    "vit_huge_patch16": (630_666_240, 656_936_704),
    # Not an official size (the demos'): counted by the torch reference built with its sizes.
    "vit_micro_patch4": (203_264, 25_481_776),
}


def _count(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_every_variant_has_pinned_parameter_counts():
    assert set(OFFICIAL_COUNTS) == set(mae_jax.VARIANTS)


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_variant_parameter_counts_match_official(name):
    encoder_count, full_count = OFFICIAL_COUNTS[name]
    abstract = nnx.eval_shape(lambda: mae_jax.create_mae(name))  # shapes only, no memory
    assert _count(abstract.encoder) == encoder_count
    assert _count(abstract) == full_count


def test_make_rngs_draws_the_keys_of_nnx_rngs_eagerly_and_inside_a_trace():
    """`make_rngs` (host counters: tracing a model without flax's per-key `.sharding` check)
    gives nnx.Rngs's keys, stream by stream, and so the same initialisation under jit; its
    counter stays a host value in a trace (what makes the check go away)."""
    from mae_jax.models.layers import make_rngs

    def draw(make):
        rngs = make(params=3, dropout=jax.random.key(4))
        keys = [rngs.params(), rngs.dropout(), rngs.params(), rngs.params(), rngs.dropout()]
        assert isinstance(rngs.params.count.get_value(), np.ndarray) == (make is make_rngs)
        return [jax.random.key_data(key) for key in keys]

    for run in (lambda f: f(), lambda f: jax.jit(f)()):
        ours, theirs = (np.asarray(run(functools.partial(draw, make))) for make in
                        (make_rngs, nnx.Rngs))
        np.testing.assert_array_equal(ours, theirs)
        assert len(np.unique(ours, axis=0)) == 5

    # Copies drawn from apart (nnx.clone shares leaves), and Rngs passed into a jit.
    for make in (make_rngs, nnx.Rngs):
        rngs = make(params=0)
        copy = nnx.clone(rngs)
        first, again = rngs.params(), copy.params()
        passed = nnx.jit(lambda rngs: (rngs.params(), rngs.params()))(make(params=0))
        np.testing.assert_array_equal(jax.random.key_data(first), jax.random.key_data(again))
        np.testing.assert_array_equal(jax.random.key_data(first),
                                      jax.random.key_data(passed[0]))
        assert not np.array_equal(jax.random.key_data(passed[0]), jax.random.key_data(passed[1]))

    def build(make):
        return nnx.state(mae_jax.MAE(**TINY, rngs=make(0)), nnx.Param)

    ours, theirs = (nnx.jit(functools.partial(build, make))() for make in (make_rngs, nnx.Rngs))
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_pinned_counts_agree_with_the_torch_reference():
    with torch.device("meta"):
        tiny = build_mae("tiny")
        micro = build_mae("tiny", patch_size=4, embed_dim=64, depth=4, num_heads=4)
    for name, reference in (("vit_tiny_patch16", tiny), ("vit_micro_patch4", micro)):
        assert OFFICIAL_COUNTS[name] == (
            count_params(reference, encoder_only=True),
            count_params(reference),
        )


def test_image_size_not_a_multiple_of_the_patch_is_refused():
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        tiny_mae(image_size=30)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        tiny_mae()(jnp.ones((1, 32, 32, 3)), rng=jax.random.key(0), mask_ratio=ratio)


def test_wrong_channel_count_or_size_is_refused_before_compiling():
    model = tiny_mae()
    with pytest.raises(ValueError, match=r"Expected images of shape \[N, 32, 32, 3\]"):
        model(jnp.ones((1, 32, 32, 1)), rng=jax.random.key(0))
    with pytest.raises(ValueError, match="channels-last"):
        model(jnp.ones((1, 3, 32, 32)), rng=jax.random.key(0))


def test_noise_and_rng_are_exclusive():
    with pytest.raises(ValueError, match="exactly one"):
        tiny_mae()(jnp.ones((1, 32, 32, 3)))


def test_checkpoint_of_another_variant_is_refused_with_every_bad_key():
    state = mae_jax.export_official(tiny_mae())
    with pytest.raises(ValueError, match="not a vit_base_patch16"):
        mae_jax.load_official(state, variant="vit_base_patch16")
    other = mae_jax.MAE(**(TINY | dict(embed_dim=64, depth=3)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError) as error:
        mae_jax.load_into(other, state)
    message = str(error.value)
    assert "missing keys (12): blocks.2." in message
    assert "mis-shaped keys" in message and "cls_token: checkpoint (1, 1, 32)" in message
    state["head.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): head.weight"):
        mae_jax.load_into(tiny_mae(), state)


def test_an_encoder_load_leaves_out_only_the_decoder_and_a_classifier_head(tmp_path, caplog):
    """QA: an encoder-only load (load_encoder, init_from) ignored every key it had no place
    for. Now only an MAE file's decoder and a classifier's head / fc_norm are left out (the
    latter said in the log); timm's layer-scale name, a relative-position table or a misspelt
    key is an error naming it; NaN in an official file is refused."""
    import logging

    from mae_jax.core.errors import WeightsError
    from mae_jax.weights.load import load_encoder

    state = mae_jax.export_official(tiny_mae())  # an MAE file: the decoder is left out
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in state.items()}},
               tmp_path / "mae.pth")
    assert isinstance(load_encoder(tmp_path / "mae.pth", num_heads=2), mae_jax.ViTEncoder)
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    for extra in ("blocks.0.ls1.gamma", "blocks.1.attn.relative_position_bias_table",
                  "blocks.0.attn.qkv_biass"):
        broken = encoder | {extra: np.ones(32, np.float32)}
        torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in broken.items()}},
                   tmp_path / "extra.pth")
        with pytest.raises(WeightsError, match=rf"unexpected keys \(1\): {extra}"):
            load_encoder(tmp_path / "extra.pth", num_heads=2)
    with_head = encoder | {"head.weight": np.zeros((10, 32), np.float32),
                           "head.bias": np.zeros(10, np.float32)}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mae_jax.weights"):
        loaded = mae_jax.load_official(with_head, model="encoder", num_heads=2)
    assert loaded.norm is not None and "its head is not part of the encoder" in caplog.text
    assert "load_official_classifier" not in caplog.text  # it reads fine-tuned (fc_norm) files
    nan = encoder | {"blocks.0.mlp.fc1.weight": np.full((128, 32), np.nan, np.float32)}
    with pytest.raises(WeightsError, match=r"NaN or inf in 1 array\(s\): blocks.0.mlp.fc1"):
        mae_jax.load_official(nan, num_heads=2)


def test_save_official_files_reload_as_the_model_they_came_from(tmp_path):
    """QA: a .pth of this code reloaded as a plain square encoder: a 32x48 grid failed, a 32x128
    one (64 patches) came back as 64x64, a segmenter's backbone lost its layer scale and
    relative-position bias without a word. The file now records them. Its tensors are
    contiguous, as safetensors requires."""
    from safetensors.torch import save_file

    from mae_jax.models.vit import ViTEncoder
    from mae_jax.weights.load import copy_encoder_from

    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 128, 3)), jnp.float32)
    for name, model in (
        ("wide_mae", tiny_mae(image_size=(32, 128))),
        ("backbone", ViTEncoder(image_size=(32, 128), patch_size=8, embed_dim=32, depth=2,
                                num_heads=2, layer_scale_init=0.5, relative_position_bias=True,
                                rngs=nnx.Rngs(1))),
    ):
        state = mae_jax.export_official(model)  # random non-zero values everywhere
        rng = np.random.default_rng(2)
        mae_jax.load_into(model, {k: v + 0.1 * rng.normal(size=v.shape) for k, v in state.items()})
        mae_jax.save_official(model, tmp_path / f"{name}.pth")
        back = mae_jax.load_official(str(tmp_path / f"{name}.pth"))
        assert type(back) is type(model)
        if name == "wide_mae":
            assert back.encoder.image_size == (32, 128)
            noise = jnp.asarray(np.random.default_rng(3).uniform(size=(1, 64)), jnp.float32)
            want, got = (m.forward(images, noise=noise, mask_ratio=0.75)["pred"]
                         for m in (model, back))
        else:
            want, got = model(images)["patches"], back(images)["patches"]
        np.testing.assert_array_equal(got, want)
        save_file(torch.load(tmp_path / f"{name}.pth", weights_only=True)["model"],
                  str(tmp_path / f"{name}.safetensors"))
    # init_from of the wide file into another size: the table resized from its real grid.
    target = ViTEncoder(image_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                        rngs=nnx.Rngs(0))
    assert copy_encoder_from(tmp_path / "wide_mae.pth", target)
    assert target.pos_embed[...].shape == (1, 65, 32)
    no_record = {"model": torch.load(tmp_path / "wide_mae.pth", weights_only=True)["model"]}
    torch.save(no_record, tmp_path / "no_record.pth")
    official_grid = mae_jax.load_official(str(tmp_path / "no_record.pth"), num_heads=2,
                                          decoder_num_heads=2)
    assert official_grid.encoder.image_size == (64, 64)  # 64 patches: read as the official 8x8


def test_a_fine_tuned_encoder_reloads_and_misuse_is_named(tmp_path):
    """QA of the Python API: a fine-tuned encoder (no final norm) saved with save_official did
    not reload ("missing norm"); a model="mae" load of an encoder-only file listed 100 missing
    decoder keys; a non-square table given its own size asked for an `old_grid` argument
    load_official does not have; a classifier or uint8 pixels met an AttributeError, or a
    loss of 20910."""
    from mae_jax.models.classifier import ViTClassifier
    from mae_jax.models.vit import ViTEncoder
    from mae_jax.weights import hf

    plain, encoder = (ViTEncoder(image_size=(32, 64), patch_size=8, embed_dim=32, depth=2,
                                 num_heads=2, rngs=nnx.Rngs(1)) for _ in range(2))
    encoder.norm = None
    mae_jax.save_official(encoder, tmp_path / "finetuned.pth")
    back = mae_jax.load_official(str(tmp_path / "finetuned.pth"))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 64, 3)), jnp.float32)
    assert back.norm is None
    np.testing.assert_array_equal(back(images, apply_norm=False)["patches"],
                                  encoder(images, apply_norm=False)["patches"])
    with pytest.raises(ValueError, match="holds an encoder alone .* model='encoder'"):
        mae_jax.load_official(str(tmp_path / "finetuned.pth"), model="mae")
    bare = mae_jax.export_official(plain)  # no record of its size
    own_size = mae_jax.load_official(bare, image_size=(32, 64), num_heads=2)  # 32 positions
    np.testing.assert_array_equal(own_size(images)["patches"], plain(images)["patches"])
    with pytest.raises(ValueError, match=r"not a square grid.*height x width / patch_size\^2 "
                       "= 32 .*transfer_encoder"):
        mae_jax.load_official(bare, image_size=64, num_heads=2)
    classifier = ViTClassifier(num_classes=3, image_size=32, patch_size=8, embed_dim=32,
                               depth=1, num_heads=2, rngs=nnx.Rngs(0))
    for save in (mae_jax.save_official, hf.save_hf):
        with pytest.raises(TypeError, match="not a ViTClassifier.*save_official_classifier"):
            save(classifier, tmp_path / "classifier")
    with pytest.raises(TypeError, match="got uint8: .*normalize_uint8"):
        back(images.astype(jnp.uint8))
    with pytest.raises(ValueError, match=r"got \(0, 32, 64, 3\)"):  # was a ZeroDivisionError
        back(images[:0])
    mae = tiny_mae()
    shape = (1, mae.encoder.image_size[0], mae.encoder.image_size[1], 3)
    noise = np.random.default_rng(1).uniform(size=(1, mae.encoder.num_patches))
    pixels = jnp.zeros(shape, jnp.float32)
    np.testing.assert_array_equal(mae(pixels, noise=noise.tolist())[0],  # a list: was an error
                                  mae(pixels, noise=jnp.asarray(noise))[0])
    with pytest.raises(ValueError, match="static_argnames"):
        jax.jit(lambda r: mae.loss(pixels, rng=jax.random.key(0), mask_ratio=r))(0.75)


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "was_run"
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as handle:
        pickle.dump({"model": {"x": _RunsCode(str(marker))}}, handle)
    with pytest.raises(ValueError, match="Refusing to load"):
        mae_jax.load_official(str(bad))
    assert not os.path.exists(marker)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    for name in ("nope.pth", "facebook/vit-mae-base"):  # QA: a Hub name, never fetched
        with pytest.raises(FileNotFoundError, match="No checkpoint at .* Hub names such as "
                           "facebook/vit-mae-base are not fetched"):
            mae_jax.load_official(str(tmp_path / name))


def test_initialisation_follows_the_official_recipe():
    model = mae_jax.MAE(**(TINY | dict(embed_dim=64, decoder_embed_dim=48)), rngs=nnx.Rngs(3))
    flat = {
        "/".join(map(str, path)): np.asarray(v[...])
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    for name, value in flat.items():
        if name == "encoder/patch_embed/proj/bias":
            # The official code leaves the conv bias at PyTorch's default U(+-1/sqrt(fan_in)),
            # fan_in = 3 * P * P = 192 here (tests/test_init_statistics.py compares with torch).
            bound = 1.0 / np.sqrt(3 * 8 * 8)
            assert np.abs(value).max() <= bound and np.std(value) > bound / 4, name
        elif name.endswith("bias"):
            assert np.all(value == 0), name
        elif name.endswith("scale"):
            assert np.all(value == 1), name
        elif name.endswith("kernel"):
            # xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); the patch-embed conv
            # on its [D, 3*P*P] view and the fused qkv from its [D, 3D] matrix.
            fan_in, fan_out = int(np.prod(value.shape[:-1])), value.shape[-1]
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            assert np.abs(value).max() <= bound, name
            assert np.std(value) == pytest.approx(bound / np.sqrt(3), rel=0.15), name
    for token in ("encoder/cls_token", "decoder/mask_token"):
        assert np.std(flat[token]) == pytest.approx(0.02, rel=0.5)
    # Position tables are fixed sin-cos, not parameters.
    assert not any("pos_embed" in name for name in flat)
