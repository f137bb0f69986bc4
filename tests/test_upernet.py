"""UPerNet head: resize / pooling primitives, parity with the plain-torch mmseg copy, loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from mae_jax.models import resize, upernet
from mae_jax.reference import torch_upernet as ref

EMBED, CHANNELS, AUX_CHANNELS, CLASSES = 32, 32, 16, 7


def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "in_size, out_size", [(32, 6), (16, 3), (7, 3), (5, 6), (8, 1), (6, 2), ((9, 7), (3, 6))]
)
def test_adaptive_avg_pool_matches_torch(in_size, out_size):
    in_hw = in_size if isinstance(in_size, tuple) else (in_size, in_size)
    x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
    got = resize.adaptive_avg_pool2d(jnp.asarray(x), out_size)
    want = nhwc(F.adaptive_avg_pool2d(nchw(x), out_size))
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((8, 8), (32, 32)),
        ((5, 7), (13, 11)),
        ((32, 32), (8, 8)),
        ((17, 23), (5, 9)),
        ((12, 10), (12, 25)),
        ((9, 9), (9, 9)),
        ((6, 4), (1, 1)),
    ],
)
def test_resize_bilinear_matches_torch_up_and_down(in_hw, out_hw):
    x = np.random.default_rng(1).normal(size=(2, *in_hw, 3)).astype(np.float32)
    got = resize.resize_bilinear(jnp.asarray(x), out_hw)
    want = nhwc(F.interpolate(nchw(x), size=out_hw, mode="bilinear", align_corners=False))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def randomized_torch_heads(dropout=0.1):
    """Torch heads with random weights and random BN affine parameters and running stats."""
    torch.manual_seed(0)
    model = ref.UPerNetHeads(EMBED, CHANNELS, AUX_CHANNELS, CLASSES, dropout=dropout)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                module.weight.normal_(0.0, 0.1)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
    return model


def flax_heads_from(torch_model, dropout=0.1):
    heads = upernet.UPerNetHeads(
        embed_dim=EMBED,
        channels=CHANNELS,
        aux_channels=AUX_CHANNELS,
        num_classes=CLASSES,
        dropout=dropout,
        rngs=nnx.Rngs(0),
    )
    ref.load_torch_upernet(heads, torch_model.state_dict())
    return heads


@functools.partial(nnx.jit, static_argnames="train")
def run(model, features, train=False):
    return model(features, train=train)  # jitted: eager op-by-op dispatch is much slower


def random_features(batch=2, size=8):
    rng = np.random.default_rng(2)
    return [rng.normal(size=(batch, size, size, EMBED)).astype(np.float32) for _ in range(4)]


def test_neck_shapes_follow_the_four_scales():
    neck = upernet.MultiScaleNeck(embed_dim=EMBED, rngs=nnx.Rngs(0))
    features = [jnp.asarray(f) for f in random_features(batch=1, size=8)]
    shapes = [p.shape for p in run(neck, features, train=False)]
    assert shapes == [(1, 32, 32, EMBED), (1, 16, 16, EMBED), (1, 8, 8, EMBED), (1, 4, 4, EMBED)]
    with pytest.raises(ValueError, match="4 feature maps"):
        neck(features[:3], train=False)


def test_eval_mode_matches_torch_reference():
    torch_model = randomized_torch_heads().eval()
    heads = flax_heads_from(torch_model)
    features = random_features()
    with torch.no_grad():
        want, want_aux = torch_model([nchw(f) for f in features])
    got, got_aux = run(heads, [jnp.asarray(f) for f in features])
    assert got.shape == (2, 32, 32, CLASSES) and got_aux.shape == (2, 8, 8, CLASSES)
    np.testing.assert_allclose(got, nhwc(want), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_aux, nhwc(want_aux), atol=1e-4, rtol=1e-4)


def test_train_mode_batch_norm_matches_torch_reference():
    # dropout 0 so that train mode differs from eval only by BatchNorm's batch statistics.
    torch_model = randomized_torch_heads(dropout=0.0).train()
    heads = flax_heads_from(torch_model, dropout=0.0)
    features = random_features(batch=3)
    want, want_aux = torch_model([nchw(f) for f in features])
    got, got_aux = run(heads, [jnp.asarray(f) for f in features], train=True)
    np.testing.assert_allclose(got, nhwc(want.detach()), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_aux, nhwc(want_aux.detach()), atol=1e-4, rtol=1e-4)
    # Running statistics move as PyTorch's (momentum 0.1, unbiased variance), in every BN
    # (the PPM's pool-scale-1 branch normalises n = 3 pixels, where n / (n - 1) is 1.5).
    torch_stats = ref.torch_to_flax_upernet(torch_model.state_dict())
    flax_stats = nnx.to_pure_dict(nnx.state(heads, nnx.BatchStat))
    flat_torch = dict(nnx.traversals.flatten_mapping(torch_stats))
    for path, value in nnx.traversals.flatten_mapping(flax_stats).items():
        np.testing.assert_allclose(value, flat_torch[path], rtol=1e-4, atol=1e-5, err_msg=path)


def test_batch_norm_running_statistics_follow_torch_batchnorm2d_over_several_steps():
    # Pins PyTorch's BatchNorm2d semantics (momentum 0.1, eps 1e-5): batch statistics in
    # training, running variance updated with the UNBIASED batch variance (n / (n - 1)), and the
    # running statistics used in evaluation. Batches of 18, 4 and 2 values per channel make the
    # n / (n - 1) factor large (up to 2); the inputs are off-centre so the means matter too.
    rng = np.random.default_rng(5)
    torch_bn = torch.nn.BatchNorm2d(5)
    flax_bn = upernet.batch_norm(5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
        torch_bn.bias.normal_(0.0, 0.3)
    flax_bn.scale[...] = jnp.asarray(torch_bn.weight.detach().numpy())
    flax_bn.bias[...] = jnp.asarray(torch_bn.bias.detach().numpy())
    for shape in [(2, 3, 3, 5), (4, 1, 1, 5), (1, 2, 1, 5)]:
        x = (3.0 + 2.0 * rng.normal(size=shape)).astype(np.float32)
        want = torch_bn.train()(nchw(x))
        got = flax_bn(jnp.asarray(x), use_running_average=False)
        np.testing.assert_allclose(got, nhwc(want.detach()), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flax_bn.mean[...], torch_bn.running_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flax_bn.var[...], torch_bn.running_var, rtol=1e-5, atol=1e-6)
    x = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    with torch.no_grad():
        want = torch_bn.eval()(nchw(x))
    got = flax_bn(jnp.asarray(x), use_running_average=True)
    np.testing.assert_allclose(got, nhwc(want), rtol=1e-5, atol=1e-5)


def test_batch_norm_computes_in_float32_and_returns_the_compute_dtype():
    # Pins the mixed-precision policy of BatchNorm: bfloat16 in and out, but the statistics and
    # running buffers stay float32 (a bfloat16 running variance would round to 3 digits).
    bn = upernet.batch_norm(4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 5, 5, 4)), jnp.bfloat16)
    y = bn(x, use_running_average=False)
    assert y.dtype == jnp.bfloat16
    assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32
    x32 = np.asarray(x, np.float32).reshape(-1, 4)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * x32.var(0, ddof=1), rtol=1e-6)
    with pytest.raises(ValueError, match="use_running_average"):
        bn(x)


def test_dropout_is_channelwise_in_train_and_off_in_eval():
    heads = upernet.UPerNetHeads(
        embed_dim=EMBED,
        channels=CHANNELS,
        aux_channels=AUX_CHANNELS,
        num_classes=CLASSES,
        dropout=0.5,
        rngs=nnx.Rngs(0),
    )
    x = jnp.ones((2, 4, 4, CHANNELS))
    classifier = heads.decode_head.classifier
    dropped = classifier.dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    # Dropout2d: a channel is either zeroed at every pixel or kept (scaled) at every pixel.
    per_channel = dropped.reshape(2, 16, CHANNELS)
    assert jnp.all(per_channel == per_channel[:, :1])
    assert jnp.any(per_channel == 0) and jnp.any(per_channel == 2.0)
    # The randomness is the call's: the same key drops the same channels.
    again = classifier.dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert jnp.array_equal(dropped, again)
    # Evaluation (train=False) never drops, with or without rngs.
    evaluated = classifier(x, train=False, rngs=nnx.Rngs(dropout=1))
    assert jnp.array_equal(evaluated, classifier.conv_seg(x))


def test_classifier_init_is_small_normal_with_zero_bias():
    head = upernet.ClassifierHead(
        channels=64, num_classes=150, dropout=0.1, dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    assert abs(float(jnp.std(head.conv_seg.kernel[...])) - 0.01) < 0.001
    assert jnp.all(head.conv_seg.bias[...] == 0)


def test_heads_jit_and_grad_in_train_mode():
    heads = upernet.UPerNetHeads(
        embed_dim=EMBED,
        channels=CHANNELS,
        aux_channels=AUX_CHANNELS,
        num_classes=CLASSES,
        rngs=nnx.Rngs(0, dropout=1),
    )
    features = [jnp.asarray(f) for f in random_features()]
    labels = jnp.asarray(np.random.default_rng(3).integers(0, CLASSES, (2, 128, 128)))

    @nnx.jit
    def loss_fn(model):
        logits, aux = model(features)
        main = upernet.segmentation_loss(logits, labels)
        return main + 0.4 * upernet.segmentation_loss(aux, labels)

    loss, grads = nnx.value_and_grad(loss_fn)(heads)
    assert np.isfinite(float(loss))
    assert float(jnp.abs(grads.decode_head.classifier.conv_seg.kernel[...]).sum()) > 0


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_loss_ignores_255_and_matches_torch_cross_entropy(avg_non_ignore):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 6, 5, CLASSES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=(2, 24, 20))
    labels[rng.random(labels.shape) < 0.3] = 255
    got = upernet.segmentation_loss(
        jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=avg_non_ignore
    )
    upsampled = F.interpolate(nchw(logits), size=(24, 20), mode="bilinear", align_corners=False)
    target = torch.from_numpy(labels)
    if avg_non_ignore:  # PyTorch's own ignore_index averaging
        want = F.cross_entropy(upsampled, target, ignore_index=255)
    else:  # mmseg's default: ignored pixels count as 0 in a mean over all pixels
        want = F.cross_entropy(upsampled, target, ignore_index=255, reduction="none").mean()
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # With every pixel ignored there is nothing to learn: the loss is exactly 0.
    all_ignored = np.full_like(labels, 255)
    assert float(upernet.segmentation_loss(jnp.asarray(logits), jnp.asarray(all_ignored))) == 0.0


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels"):
        upernet.segmentation_loss(jnp.zeros((2, 4, 4, 3)), jnp.zeros((4, 4), jnp.int32))


def test_heads_run_under_data_sharded_jit():
    # Batch sharded over 4 devices: BN statistics are global (same result as unsharded).
    heads = upernet.UPerNetHeads(
        embed_dim=EMBED,
        channels=CHANNELS,
        aux_channels=AUX_CHANNELS,
        num_classes=CLASSES,
        dropout=0.0,
        rngs=nnx.Rngs(0),
    )
    features = [jnp.asarray(f) for f in random_features(batch=4, size=4)]
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = [jax.device_put(f, sharding) for f in features]
    graphdef, state = nnx.split(heads)

    @jax.jit
    def forward(state, feats):
        return nnx.merge(graphdef, state)(feats)[0]

    np.testing.assert_allclose(forward(state, sharded), forward(state, features), atol=1e-5)

    # Training mode: the running statistics (unbiased variance) are those of the global batch,
    # whether the batch is sharded or not (SyncBN).
    @jax.jit
    def train_stats(state, feats):
        model = nnx.merge(graphdef, state)
        model(feats, train=True)
        return nnx.state(model, nnx.BatchStat)

    sharded_stats, local_stats = train_stats(state, sharded), train_stats(state, features)
    for a, b in zip(jax.tree.leaves(sharded_stats), jax.tree.leaves(local_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
