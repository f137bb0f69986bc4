"""The mixed-precision policy (dtype=bfloat16), as the official fp16-autocast runs compute:
float32 parameters and residual stream, 16-bit matmuls / convs / attention, float32
LayerNorm statistics, softmax, biases on the logits and losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mae_jax
from mae_jax.models import upernet
from mae_jax.models.attention import Attention
from mae_jax.models.layers import layer_norm
from mae_jax.models.mae import reconstruction_loss
from mae_jax.models.segmenter import MAESegmenter
from mae_jax.models.vit import Block

TINY = dict(
    image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
    decoder_depth=2, decoder_num_heads=2,
)


@pytest.fixture(scope="module")
def inputs():
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(1), (2, 16))
    return images, noise


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_every_block_gets_a_float32_residual_stream_in_bfloat16(inputs, monkeypatch):
    # Pins: patch embedding + position table, cls token, decoder embedding + mask token + decoder
    # table all stay float32, so every encoder and decoder block sees (and returns) float32.
    images, noise = inputs
    model = mae_jax.MAE(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    seen = []
    block_call = Block.__call__

    def spy(self, x, **kwargs):
        out = block_call(self, x, **kwargs)
        seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(Block, "__call__", spy)
    loss, pred, _ = model(images, noise=noise)
    assert seen == [(jnp.float32, jnp.float32)] * (TINY["depth"] + TINY["decoder_depth"])
    assert loss.dtype == jnp.float32
    assert pred.dtype == jnp.bfloat16  # decoder_pred is a bf16 matmul, as under autocast
    params = nnx.state(model, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_encoder_features_keep_float32_before_the_final_norm_and_bf16_after():
    encoder = mae_jax.create_encoder(
        "vit_micro_patch4", image_size=16, depth=2, layer_scale_init=1e-3,
        relative_position_bias=True, dtype=jnp.bfloat16,
    )
    out = encoder(jnp.ones((1, 16, 16, 3)), return_blocks=(0, 1))
    assert [block.dtype for block in out["blocks"]] == [jnp.float32] * 2
    assert out["patches"].dtype == jnp.bfloat16  # LayerNorm output feeds a bf16 matmul


def test_layer_norm_takes_statistics_of_the_float32_input():
    # Values 10 + u with u ~ U(0, 0.25): bfloat16 (8 significant bits, steps of 1/16 near 10)
    # would quantise them to 5 levels, so a LayerNorm that cast its input first would be off by
    # up to ~0.4. Ours normalises the float32 input and rounds only its output.
    x = 10.0 + 0.25 * jax.random.uniform(jax.random.key(2), (4, 64))
    norm16 = layer_norm(64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    norm32 = layer_norm(64, dtype=jnp.float32, rngs=nnx.Rngs(0))
    got, want = norm16(x), norm32(x)
    assert got.dtype == jnp.bfloat16 and want.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02)
    assert float(jnp.std(want)) == pytest.approx(1.0, rel=1e-3)


def test_relative_position_bias_is_added_to_float32_logits_in_bfloat16():
    # A bias of 100 + u: shifting every logit by 100 does not change the softmax, but a bias
    # rounded to bfloat16 (steps of 0.5 near 100) would. Pins the bias and the logits as float32
    # in the XLA path, so the bf16 output stays close to the float32 one.
    kwargs = dict(dim=16, num_heads=2, attention_impl="xla", relative_grid=(2, 3))
    attn16 = Attention(**kwargs, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    attn32 = Attention(**kwargs, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rows = attn16.relative_position_bias_table.shape
    table = 100.0 + 2.0 * jax.random.uniform(jax.random.key(3), rows)
    attn16.relative_position_bias_table[...] = table
    attn32.relative_position_bias_table[...] = table
    x = jax.random.normal(jax.random.key(4), (2, 7, 16))
    got, want = attn16(x), attn32(x)
    assert got.dtype == jnp.bfloat16
    assert relative_error(got, want) < 0.02


def test_bfloat16_model_stays_close_to_float32(inputs):
    # Same weights and noise: the loss within 1% and the prediction within a few bf16 ulps
    # (bf16 has a relative precision of 2**-8 = 0.4%).
    images, noise = inputs
    loss32, pred32, _ = mae_jax.MAE(**TINY, rngs=nnx.Rngs(0))(images, noise=noise)
    loss16, pred16, _ = mae_jax.MAE(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(
        images, noise=noise
    )
    assert float(loss16) == pytest.approx(float(loss32), rel=0.01)
    assert relative_error(pred16, pred32) < 0.02


def test_losses_are_float32_for_bfloat16_predictions():
    pred = jax.random.normal(jax.random.key(5), (2, 4, 12), jnp.bfloat16)
    target = jax.random.normal(jax.random.key(6), (2, 4, 12))
    mask = jnp.ones((2, 4))
    assert reconstruction_loss(target, pred, mask, norm_pix_loss=True).dtype == jnp.float32
    logits = jax.random.normal(jax.random.key(7), (2, 4, 4, 5), jnp.bfloat16)
    labels = jnp.zeros((2, 16, 16), jnp.int32)
    assert upernet.segmentation_loss(logits, labels).dtype == jnp.float32


def test_segmenter_in_bfloat16_matches_float32_closely():
    # The backbone's features are float32 (residual stream), the heads run bf16 convs with
    # float32 BatchNorm statistics; evaluation logits stay close to the float32 model's.
    kwargs = dict(
        variant="vit_micro_patch4", image_size=16, depth=2, out_indices=(0, 1, 0, 1),
        channels=16, aux_channels=16, num_classes=4,
    )
    images = jax.random.normal(jax.random.key(8), (2, 16, 16, 3))

    @jax.jit  # one compilation instead of hundreds of eager ones (this test took 22 s eagerly)
    def features_and_logits(images):
        model16 = MAESegmenter(**kwargs, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        model32 = MAESegmenter(**kwargs, rngs=nnx.Rngs(0))
        return model16.features(images), model16(images)[0], model32(images)[0]

    features16, logits16, logits32 = features_and_logits(images)
    assert {f.dtype for f in features16} == {jnp.dtype(jnp.float32)}
    assert logits16.dtype == jnp.bfloat16
    assert relative_error(logits16, logits32) < 0.03
