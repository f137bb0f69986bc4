"""BEiT relative position bias (mae_jax.models.attention) against expectations built without it.

Two references: (1) a formulation from first principles: every pair of tokens gets its
(dy, dx) offset computed directly, and the index must be a bijection from offsets onto the
(2h-1)(2w-1) table rows, in BEiT's row-major order, with cls rows / columns on the three
extra rows; (2) transformers' BEiT (`BeitRelativePositionBias.generate_relative_position_index`,
taking window_size = (h, w), and `BeitAttention`), with our table and weights copied in.

transformers' `BeitRelativePositionBias.forward` cannot serve for non-square grids: it
reshapes the table's first rows as (2w-1, 2h-1) and bilinearly resizes them to (2h-1, 2w-1)
(its "arbitrary window size" path, always taken), which is the identity only when h == w
(measured here: for (2, 3) and (3, 5) its bias differs from its own index's lookup by up to
~4 on a N(0, 1) table). timm's and mmseg's BEiT look the table up with the index directly,
so the tests use transformers' index with a plain lookup, and forward() on a square grid.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import BeitConfig
from transformers.models.beit.modeling_beit import BeitAttention, BeitRelativePositionBias

from mae_jax.models.attention import Attention, relative_position_index

GRIDS = [(2, 3), (3, 5), (5, 3), (1, 4), (3, 3)]


def _offsets(height, width):
    """[T-1, T-1, 2] (dy, dx) between patch tokens; patch (y, x) is token 1 + y * w + x."""
    ys, xs = np.divmod(np.arange(height * width), width)
    return np.stack([ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]], axis=-1)


@pytest.mark.parametrize("grid", GRIDS)
def test_index_is_a_bijection_from_token_offsets_onto_the_table(grid):
    """Pins: two token pairs share an index iff they share (dy, dx); the (2h-1)(2w-1) offsets
    fill rows 0 .. (2h-1)(2w-1)-1 in BEiT's order (dy + h - 1) * (2w - 1) + (dx + w - 1) (the
    order pretrained tables use); cls query row -> rows - 3, cls key column -> rows - 2,
    cls-cls -> rows - 1, where rows = (2h-1)(2w-1) + 3. Exact."""
    height, width = grid
    index = relative_position_index(grid)
    tokens = 1 + height * width
    rows = (2 * height - 1) * (2 * width - 1) + 3
    assert index.shape == (tokens, tokens)
    offsets = _offsets(height, width)
    patch = index[1:, 1:]
    offset_ids = [tuple(o) for o in offsets.reshape(-1, 2)]
    first_index = {}
    for offset, value in zip(offset_ids, patch.reshape(-1), strict=True):
        assert first_index.setdefault(offset, value) == value  # same offset -> same index
    assert len(set(first_index.values())) == len(first_index)  # different -> different
    assert len(first_index) == (2 * height - 1) * (2 * width - 1)
    expected = (offsets[..., 0] + height - 1) * (2 * width - 1) + offsets[..., 1] + width - 1
    np.testing.assert_array_equal(patch, expected)
    assert sorted(first_index.values()) == list(range(rows - 3))
    assert (index[0, 1:] == rows - 3).all() and (index[1:, 0] == rows - 2).all()
    assert index[0, 0] == rows - 1


@pytest.mark.parametrize("grid", GRIDS)
def test_index_equals_transformers_beit(grid):
    """relative_position_index vs transformers' BeitRelativePositionBias index for
    window_size (h, w), and the table size vs its num_relative_distance. Exact."""
    theirs = BeitRelativePositionBias.generate_relative_position_index(grid).numpy()
    np.testing.assert_array_equal(relative_position_index(grid), theirs)
    config = BeitConfig(image_size=(grid[0] * 4, grid[1] * 4), patch_size=4, hidden_size=8,
                        num_attention_heads=2)
    bias = BeitRelativePositionBias(config)
    ours = Attention(dim=8, num_heads=2, dtype=jnp.float32, attention_impl=None,
                     relative_grid=grid, rngs=nnx.Rngs(0))
    assert ours.relative_position_bias_table[...].shape == tuple(
        bias.relative_position_bias_table.shape)


def _copy_into_beit(ours: Attention, dim, heads):
    """A BeitAttention holding our qkv / proj weights. BEiT's k_proj has no bias: the caller
    zeroes ours (a k bias only shifts each query's logits by a constant anyway)."""
    config = BeitConfig(hidden_size=dim, num_attention_heads=heads,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    beit = BeitAttention(config).eval()
    kernel = np.asarray(ours.qkv.kernel[...])  # [D, 3D]: q, k, v outputs
    bias = np.asarray(ours.qkv.bias[...])
    with torch.no_grad():
        for i, proj in enumerate((beit.q_proj, beit.k_proj, beit.v_proj)):
            proj.weight.copy_(torch.from_numpy(kernel[:, i * dim:(i + 1) * dim].T.copy()))
            if proj.bias is not None:
                proj.bias.copy_(torch.from_numpy(bias[i * dim:(i + 1) * dim].copy()))
        beit.o_proj.weight.copy_(torch.from_numpy(np.asarray(ours.proj.kernel[...]).T.copy()))
        beit.o_proj.bias.copy_(torch.from_numpy(np.asarray(ours.proj.bias[...]).copy()))
    return beit


@pytest.mark.parametrize("grid", [(2, 3), (3, 5), (3, 3)])
def test_attention_with_relative_bias_equals_transformers_beit(grid):
    """Attention(relative_grid=(h, w)) output vs transformers' BeitAttention given the bias
    [1, H, T, T] = table[their index] (and, on the square grid, their module's own forward())
    with our random table and weights copied in: max |diff| < 1e-5 (float32). Also pins that
    the bias matters (zero table: the outputs move by > 0.1)."""
    dim, heads = 16, 4
    height, width = grid
    tokens = 1 + height * width
    ours = Attention(dim=dim, num_heads=heads, dtype=jnp.float32, attention_impl=None,
                     relative_grid=grid, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(sum(grid))
    table = rng.normal(0, 1.0, ours.relative_position_bias_table[...].shape).astype(np.float32)
    ours.relative_position_bias_table[...] = jnp.asarray(table)
    ours.qkv.bias[...] = jnp.asarray(rng.normal(0, 0.1, 3 * dim), jnp.float32).at[
        dim:2 * dim].set(0.0)
    ours.proj.bias[...] = jnp.asarray(rng.normal(0, 0.1, dim), jnp.float32)
    x = rng.normal(size=(2, tokens, dim)).astype(np.float32)
    got = np.asarray(ours(jnp.asarray(x)))

    beit = _copy_into_beit(ours, dim, heads)
    index = BeitRelativePositionBias.generate_relative_position_index(grid)
    bias = torch.from_numpy(table)[index.reshape(-1)].reshape(tokens, tokens, heads)
    bias = bias.permute(2, 0, 1)[None]
    if height == width:
        config = BeitConfig(image_size=height * 4, patch_size=4, hidden_size=dim,
                            num_attention_heads=heads)
        module = BeitRelativePositionBias(config)
        with torch.no_grad():
            module.relative_position_bias_table.copy_(torch.from_numpy(table))
            torch.testing.assert_close(module(grid), bias, rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = beit(torch.from_numpy(x), attention_mask=bias)[0].numpy()
        unbiased = beit(torch.from_numpy(x))[0].numpy()
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(got - unbiased).max() > 0.1
