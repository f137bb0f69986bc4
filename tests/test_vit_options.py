"""Backbone options used by segmentation: relative position bias, layer scale, drop path."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.models.attention import Attention, relative_position_index
from mae_jax.models.vit import Block, ViTEncoder


def test_relative_position_index_follows_beit():
    index = relative_position_index((2, 2))
    num_relative = 3 * 3 + 3
    assert index[0, 0] == num_relative - 1
    assert np.all(index[0, 1:] == num_relative - 3) and np.all(index[1:, 0] == num_relative - 2)
    # Token (r, c) to token (r', c'): ((r - r' + 1) * 3) + (c - c' + 1).
    for a in range(4):
        for b in range(4):
            (ra, ca), (rb, cb) = divmod(a, 2), divmod(b, 2)
            assert index[1 + a, 1 + b] == (ra - rb + 1) * 3 + (ca - cb + 1)


def test_attention_adds_the_relative_bias_to_the_logits():
    attention = Attention(dim=8, num_heads=2, dtype=jnp.float32, attention_impl="xla",
                          relative_grid=(2, 3), rngs=nnx.Rngs(0))
    table = jax.random.normal(jax.random.key(1), attention.relative_position_bias_table.shape)
    attention.relative_position_bias_table[...] = table
    x = jax.random.normal(jax.random.key(2), (2, 7, 8))
    qkv = attention.qkv(x).reshape(2, 7, 3, 2, 4)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    bias = table[relative_position_index((2, 3))].transpose(2, 0, 1)
    weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / 2.0 + bias, axis=-1)
    expected = attention.proj((weights @ v).transpose(0, 2, 1, 3).reshape(2, 7, 8))
    np.testing.assert_allclose(attention(x), expected, atol=1e-5)


def test_zero_initialised_bias_and_unit_layer_scale_leave_the_encoder_unchanged():
    kwargs = dict(image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    plain = ViTEncoder(**kwargs, rngs=nnx.Rngs(0))
    extended = ViTEncoder(**kwargs, relative_position_bias=True, layer_scale_init=1.0,
                          rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    np.testing.assert_allclose(
        extended(images)["patches"], plain(images)["patches"], atol=1e-6
    )


def test_drop_path_drops_whole_samples_only_when_given_rngs():
    block = Block(dim=8, num_heads=2, drop_path=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (256, 3, 8))
    np.testing.assert_array_equal(block(x), block(x))  # no rngs: deterministic
    # The randomness is the call's own: the same key gives the same draw.
    np.testing.assert_array_equal(block(x, rngs=nnx.Rngs(dropout=1)),
                                  block(x, rngs=nnx.Rngs(dropout=1)))
    assert not np.array_equal(block(x, rngs=nnx.Rngs(dropout=1)), block(x))
    residual_only = block.drop_path(jnp.ones((256, 3, 8)), rngs=nnx.Rngs(dropout=1))
    kept = np.asarray(residual_only[:, 0, 0]) > 0
    assert 0.3 < kept.mean() < 0.7  # about half the samples keep their branch
    np.testing.assert_allclose(np.asarray(residual_only)[kept], 2.0)  # rescaled by 1 / keep
    assert np.all(np.asarray(residual_only)[~kept] == 0)
