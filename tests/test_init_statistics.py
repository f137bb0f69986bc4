"""Initial parameter distributions against the PyTorch models' own initialisation.

The references are torch's initialisers themselves, run by the plain-torch copies of the
official code (mae_jax/reference): `nn.Conv2d` / `nn.ConvTranspose2d` default weight and bias
init, `nn.init.xavier_uniform_`, `nn.init.kaiming_normal_`, `nn.init.normal_`. Each tensor is
compared by summary statistics with tolerances from its size (not against hand-written
expectations): mean and standard deviation within 6 standard errors, the same bounds (few
values of one lie outside the other's [min, max]) and the same shape of distribution (a
two-sample Kolmogorov-Smirnov test). Deterministic tensors (ones, zeros, sin-cos tables) must
be equal.
"""

import numpy as np
import scipy.stats
import torch
from flax import nnx

import mae_jax
from mae_jax.models import upernet
from mae_jax.reference import torch_upernet
from mae_jax.reference.torch_mae import build_mae, official_state_dict

# At most this many values of one tensor may lie beyond the other's extremes. For two samples
# of one continuous distribution the count of one beyond the other's maximum is about
# geometric(1/2): P(count > 20) ~ 1e-6. A wrong bound or a missing tail puts a fixed
# fraction of the values outside.
BEYOND_EXTREMES = 20


def assert_same_init(name: str, ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape, name
    ours, reference = ours.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    if reference.std() == 0 or ours.std() == 0:
        np.testing.assert_allclose(ours, reference, atol=1e-7, err_msg=name)
        return
    n = ours.size
    spread = reference.std()
    # Mean: each sample mean has standard error std / sqrt(n); the difference sqrt(2) that.
    assert abs(ours.mean() - reference.mean()) <= 6 * spread * np.sqrt(2 / n), name
    # Std: the relative standard error of a sample std is <= ~0.71 / sqrt(n) (normal
    # data; uniform is 0.45): 6 standard errors of the difference is 6 / sqrt(n).
    assert abs(ours.std() / spread - 1) <= 6 / np.sqrt(n), name
    # Bounds: the same support, up to the last few order statistics.
    assert np.sum((ours > reference.max()) | (ours < reference.min())) <= BEYOND_EXTREMES, name
    assert np.sum((reference > ours.max()) | (reference < ours.min())) <= BEYOND_EXTREMES, name
    # Shape: same distribution (p is ~uniform under the null; 1e-6 never fails by chance).
    assert scipy.stats.ks_2samp(ours, reference).pvalue > 1e-6, name


MAE_SIZES = dict(
    patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=128,
    decoder_depth=1, decoder_num_heads=4,
)


def test_mae_initialisation_matches_the_official_models_own_init():
    # Pins every tensor of a fresh MAE (the vit_micro_patch4 encoder width, 32 px) against the
    # official `initialize_weights` run by torch: xavier_uniform Linears (qkv from its [3D, D]
    # matrix), the patch-embed weight on its [D, 3*P*P] view, its bias left at torch's default
    # U(+-1/sqrt(3*P*P)), zero Linear biases, LayerNorm 1/0, cls / mask tokens N(0, 0.02) and
    # the fixed sin-cos tables.
    torch.manual_seed(0)
    reference = official_state_dict(build_mae("tiny", img_size=32, **MAE_SIZES))
    ours = mae_jax.export_official(mae_jax.MAE(image_size=32, **MAE_SIZES, rngs=nnx.Rngs(0)))
    assert ours.keys() == reference.keys()
    for key in sorted(reference):
        assert_same_init(key, ours[key], reference[key])


def mmseg_initialised_torch_heads(embed, channels, aux_channels, classes):
    """The plain-torch mmseg heads with mmseg's own initialisation applied.

    The reference module builds plain `nn.Conv2d`s; mmseg's classes re-initialise them, which
    this writes out with torch's initialisers: mmcv's ConvModule calls `kaiming_init(conv,
    a=0, mode='fan_out', nonlinearity='relu', distribution='normal')` and `constant_init(norm,
    1, bias=0)` in its constructor; BaseDecodeHead's init_cfg is `Normal(std=0.01)` on
    `conv_seg` (bias 0). The neck (`Feature2Pyramid`, a plain nn.Module) keeps torch's default
    ConvTranspose2d / BatchNorm init, which is what it is compared on.
    """
    torch.manual_seed(1)
    model = torch_upernet.UPerNetHeads(embed, channels, aux_channels, classes)
    for name, module in model.named_modules():
        if isinstance(module, torch_upernet.ConvModule):
            torch.nn.init.kaiming_normal_(
                module.conv.weight, a=0, mode="fan_out", nonlinearity="relu"
            )
        elif name.endswith("conv_seg"):
            torch.nn.init.normal_(module.weight, 0.0, 0.01)
            torch.nn.init.zeros_(module.bias)
    return model


def test_upernet_initialisation_matches_torch_and_mmseg_init():
    # Pins the neck's ConvTranspose weights AND biases at torch's default (U(+-1/sqrt(fan_in)),
    # fan_in = out_channels * 2 * 2), kaiming-normal fan_out convs, N(0, 0.01) classifiers with
    # zero bias, BatchNorm scale 1 / bias 0 / running mean 0 / running var 1.
    embed, channels, aux_channels, classes = 64, 64, 32, 150
    reference = mmseg_initialised_torch_heads(embed, channels, aux_channels, classes)
    heads = upernet.UPerNetHeads(
        embed_dim=embed, channels=channels, aux_channels=aux_channels, num_classes=classes,
        rngs=nnx.Rngs(0),
    )
    converted = dict(nnx.traversals.flatten_mapping(
        torch_upernet.torch_to_flax_upernet(reference.state_dict())
    ))
    ours = dict(nnx.traversals.flatten_mapping(
        nnx.to_pure_dict(nnx.state(heads, nnx.Any(nnx.Param, nnx.BatchStat)))
    ))
    assert ours.keys() == converted.keys()
    for path in sorted(ours, key=str):
        assert_same_init("/".join(map(str, path)), np.asarray(ours[path]), converted[path])
