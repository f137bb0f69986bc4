"""Checks that the plain-PyTorch MAE reference behaves like the official `models_mae.py`."""

import numpy as np
import pytest
import torch
from torch import nn

from mae_jax.reference import torch_mae as ref


def tiny_mae(img_size=32, **overrides):
    kwargs = dict(
        img_size=img_size,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    torch.manual_seed(0)
    return ref.MaskedAutoencoderViT(**{**kwargs, **overrides})


@pytest.mark.parametrize("grid", [4, (3, 5)])
def test_sincos_layout_cls_zero_sin_cos_halves_column_then_row(grid):
    dim = 16
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    table = ref.get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert table.shape == (1 + gh * gw, dim) and table.dtype == np.float64
    np.testing.assert_array_equal(table[0], 0.0)
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    for row, col in [(0, 0), (1, 2), (gh - 1, gw - 1), (2, 0)]:
        expected = np.concatenate(
            [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
        )
        np.testing.assert_allclose(table[1 + row * gw + col], expected, rtol=0, atol=1e-15)
    no_cls = ref.get_2d_sincos_pos_embed(dim, grid)
    np.testing.assert_array_equal(no_cls, table[1:])


def test_sincos_square_int_and_tuple_agree():
    np.testing.assert_array_equal(
        ref.get_2d_sincos_pos_embed(32, 7, True), ref.get_2d_sincos_pos_embed(32, (7, 7), True)
    )


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_masking_keeps_int_len_times_one_minus_ratio(mask_ratio):
    model = tiny_mae(img_size=48)  # L = 36
    x = torch.randn(3, 36, 5)
    noise = torch.rand(3, 36)
    x_masked, mask, ids_restore = model.random_masking(x, mask_ratio, noise)
    len_keep = int(36 * (1 - mask_ratio))
    assert x_masked.shape == (3, len_keep, 5)
    np.testing.assert_array_equal(mask.sum(1).numpy(), 36 - len_keep)
    ids_shuffle = torch.argsort(noise, dim=1)
    # The kept tokens are the lowest-noise ones, in ascending noise order.
    expected = torch.stack([x[i, ids_shuffle[i, :len_keep]] for i in range(3)])
    torch.testing.assert_close(x_masked, expected)
    unshuffled = torch.gather(ids_shuffle, 1, ids_restore)
    torch.testing.assert_close(unshuffled, torch.arange(36).expand(3, 36))
    kept = torch.zeros(3, 36)
    kept.scatter_(1, ids_shuffle[:, :len_keep], 1.0)
    torch.testing.assert_close(mask, 1.0 - kept)


def test_patchify_feature_order_and_roundtrip_non_square():
    model = tiny_mae(img_size=(16, 32))
    imgs = torch.randn(2, 3, 16, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 2 * 4, 8 * 8 * 3)
    n, patch_row, patch_col, i, j, c = 1, 1, 2, 3, 5, 2
    value = imgs[n, c, patch_row * 8 + i, patch_col * 8 + j]
    assert patches[n, patch_row * 4 + patch_col, (i * 8 + j) * 3 + c] == value
    torch.testing.assert_close(model.unpatchify(patches), imgs, rtol=0, atol=0)


def test_patch_embed_conv_equals_linear_on_patchified_pixels():
    model = tiny_mae()
    ref.randomize_(model, seed=1)
    imgs = torch.randn(2, 3, 32, 32)
    w = model.patch_embed.proj.weight  # [D, C, P, P] -> [D, P*P*C] in patchify's order
    linear = model.patchify(imgs) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T
    expected = linear + model.patch_embed.proj.bias
    torch.testing.assert_close(model.patch_embed(imgs), expected, rtol=1e-5, atol=1e-5)


def test_block_equals_torch_pre_norm_transformer_layer():
    block = ref.Block(32, 4)
    ref.randomize_(block, seed=2)
    layer = nn.TransformerEncoderLayer(
        32, 4, 128, dropout=0.0, activation="gelu", layer_norm_eps=1e-6,
        batch_first=True, norm_first=True,
    ).eval()
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)
        layer.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
        for dst, src in [
            (layer.self_attn.out_proj, block.attn.proj), (layer.linear1, block.mlp.fc1),
            (layer.linear2, block.mlp.fc2), (layer.norm1, block.norm1), (layer.norm2, block.norm2),
        ]:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), layer(x), rtol=1e-5, atol=1e-5)


def test_norm_pix_target_uses_unbiased_variance_and_loss_ignores_visible_patches():
    model = tiny_mae(norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32)
    patches = model.patchify(imgs).numpy()
    mean = patches.mean(-1, keepdims=True)
    var = patches.var(-1, ddof=1, keepdims=True)
    target = (patches - mean) / np.sqrt(var + 1e-6)
    np.testing.assert_allclose(model.forward_target(imgs).numpy(), target, rtol=1e-5, atol=1e-5)
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1.0
    # Exact on removed patches, garbage on visible ones: loss must still be 0.
    pred = torch.where(mask[..., None] > 0, torch.from_numpy(target), torch.randn(2, 16, 192))
    assert model.forward_loss(imgs, pred, mask).item() < 1e-10
    pred = torch.from_numpy(target) + 0.5 * mask[..., None]
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), torch.tensor(0.25))


@pytest.mark.parametrize("img_size", [32, (32, 48)])
def test_forward_shapes_keys_and_determinism_with_explicit_noise(img_size):
    model = tiny_mae(img_size=img_size)
    ref.randomize_(model, seed=3)
    gh, gw = ref._pair(img_size)[0] // 8, ref._pair(img_size)[1] // 8
    imgs = torch.randn(2, 3, gh * 8, gw * 8)
    noise = torch.rand(2, gh * gw)
    loss, pred, mask, ids_restore = model.forward_with_ids_restore(imgs, 0.75, noise)
    assert pred.shape == (2, gh * gw, 192) and mask.shape == ids_restore.shape == (2, gh * gw)
    again = model(imgs, mask_ratio=0.75, noise=noise)
    torch.testing.assert_close(again[0], loss, rtol=0, atol=0)
    state = ref.official_state_dict(model)
    assert all(v.dtype == np.float32 for v in state.values())
    assert {k for k in state if not k.startswith(("blocks.", "decoder_blocks."))} == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "norm.weight", "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight",
        "decoder_embed.bias", "decoder_norm.weight", "decoder_norm.bias",
        "decoder_pred.weight", "decoder_pred.bias",
    }
    block_keys = {k[len("blocks.0."):] for k in state if k.startswith("blocks.0.")}
    assert block_keys == {
        f"{m}.{p}" for m in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
        for p in ["weight", "bias"]
    }
    np.testing.assert_array_equal(
        state["pos_embed"][0], ref.get_2d_sincos_pos_embed(32, (gh, gw), True).astype(np.float32)
    )
    clone = tiny_mae(img_size=img_size)
    ref.load_numpy_state_dict(clone, state)
    torch.testing.assert_close(clone(imgs, 0.75, noise)[1], pred, rtol=0, atol=0)


def test_randomize_changes_every_learned_param_but_not_pos_embeds():
    model = tiny_mae()
    before = ref.official_state_dict(model)
    after = ref.official_state_dict(ref.randomize_(model, seed=4))
    for key in before:
        changed = not np.array_equal(before[key], after[key])
        assert changed == (key not in ref.FIXED_KEYS), key


def test_interpolate_pos_embed_identity_when_sizes_equal_and_resizes_otherwise():
    model = tiny_mae()  # 4x4 grid
    table = ref.get_2d_sincos_pos_embed(32, 4, True)[None].astype(np.float32)
    checkpoint = {"pos_embed": torch.from_numpy(table)}
    ref.interpolate_pos_embed(model, checkpoint)
    np.testing.assert_array_equal(checkpoint["pos_embed"].numpy(), table)
    np.testing.assert_array_equal(ref.interpolate_pos_embed_array(table, 4), table)

    small = ref.get_2d_sincos_pos_embed(32, 2, True)[None].astype(np.float32)
    checkpoint = {"pos_embed": torch.from_numpy(small)}
    ref.interpolate_pos_embed(model, checkpoint)
    resized = ref.interpolate_pos_embed_array(small, (4, 4))
    assert resized.shape == (1, 17, 32)
    np.testing.assert_array_equal(checkpoint["pos_embed"].numpy(), resized)
    np.testing.assert_array_equal(resized[:, 0], small[:, 0])  # cls kept
    grid = torch.from_numpy(small[:, 1:]).reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic")
    np.testing.assert_allclose(resized[0, 1:], expected[0].permute(1, 2, 0).reshape(16, 32))
    assert ref.interpolate_pos_embed_array(small, (3, 5)).shape == (1, 16, 32)


def analytic_counts(embed_dim, depth, patch_size, img_size=224, dec=512, dec_depth=8, chans=3):
    """(encoder trainable, encoder pos, decoder trainable, decoder pos) from the shapes alone."""
    num_patches = (img_size // patch_size) ** 2
    block = lambda d: 12 * d * d + 13 * d  # noqa: E731  qkv, proj, fc1, fc2, 2 LayerNorms
    pixels = patch_size * patch_size * chans
    encoder = embed_dim * pixels + embed_dim + embed_dim + depth * block(embed_dim) + 2 * embed_dim
    decoder = embed_dim * dec + dec + dec + dec_depth * block(dec) + 2 * dec + dec * pixels + pixels
    return encoder, (num_patches + 1) * embed_dim, decoder, (num_patches + 1) * dec


# (variant, patch): encoder trainable, encoder incl. pos, full trainable, full incl. pos embeds.
OFFICIAL_COUNTS = {
    ("tiny", 16): (5_486_592, 5_524_416, 31_200_000, 31_338_688),
    ("small", 16): (21_590_016, 21_665_664, 47_401_728, 47_578_240),
    ("base", 16): (85_647_360, 85_798_656, 111_655_680, 111_907_840),
    ("large", 16): (303_099_904, 303_301_632, 329_239_296, 329_541_888),
    ("huge", 14): (630_435_840, 630_764_800, 656_613_964, 657_074_508),
    ("huge", 16): (630_666_240, 630_918_400, 656_936_704, 657_289_728),
}


@pytest.mark.parametrize("variant,patch", list(OFFICIAL_COUNTS))
def test_parameter_counts_at_224(variant, patch):
    with torch.device("meta"):  # shapes only: no memory or init time for Large/Huge
        model = ref.build_mae(variant, patch_size=patch)
    counts = (
        ref.count_params(model, encoder_only=True),
        ref.count_params(model, encoder_only=True, include_fixed=True),
        ref.count_params(model),
        ref.count_params(model, include_fixed=True),
    )
    cfg = ref.VARIANTS[variant]
    enc, enc_pos, dec, dec_pos = analytic_counts(cfg["embed_dim"], cfg["depth"], patch)
    assert counts == (enc, enc + enc_pos, enc + dec, enc + enc_pos + dec + dec_pos)
    assert counts == OFFICIAL_COUNTS[(variant, patch)]
