"""mmsegmentation MAE + UPerNet checkpoints: key names and shapes, placement, function, export.

References, written here from mmseg's source (not generated from our code):
  * `expected_mmseg_shapes`: the key list of mmseg's `EncoderDecoder` for the MAE UPerNet
    config (mmseg/models/backbones/mae.py + beit.py, mmcv FFN / ConvModule, Feature2Pyramid,
    UPerHead, FCNHead), for a small model;
  * `TorchSegmentor`: a plain-PyTorch copy of that model (backbone below; neck and heads from
    `mae_jax.reference.torch_upernet`), whose `state_dict()` must have exactly those keys and
    shapes.
Its random weights are saved with torch.save as `{"state_dict", "meta"}`, like mmseg does.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from mae_jax.models.segmenter import MAESegmenter  # noqa: E402
from mae_jax.reference import torch_upernet as ref  # noqa: E402
from mae_jax.weights import mmseg  # noqa: E402

D, DEPTH, HEADS, IMAGE, PATCH = 32, 4, 2, 32, 4
GRID = IMAGE // PATCH  # 8 x 8 patches
C, AUX, K = 16, 16, 5  # decode channels, auxiliary channels, classes
TOL = 5e-5  # measured max |diff| 4e-6 on logits of magnitude ~4


def build_segmenter(**overrides):
    kwargs = dict(
        variant="vit_tiny_patch16", image_size=IMAGE, patch_size=PATCH, embed_dim=D, depth=DEPTH,
        num_heads=HEADS, out_indices=(0, 1, 2, 3), channels=C, aux_channels=AUX, num_classes=K,
        rngs=nnx.Rngs(0),
    )
    return MAESegmenter(**(kwargs | overrides))


# --------------------------------------------------------------------------- mmseg key list
def expected_mmseg_shapes(qv_bias=False):
    """mmseg state dict keys -> shapes for this small MAE UPerNet (final_norm=False)."""
    tokens, rows = GRID * GRID + 1, (2 * GRID - 1) ** 2 + 3
    shapes = {
        "backbone.cls_token": (1, 1, D),
        "backbone.pos_embed": (1, tokens, D),
        "backbone.patch_embed.projection.weight": (D, 3, PATCH, PATCH),
        "backbone.patch_embed.projection.bias": (D,),
    }
    for i in range(DEPTH):
        layer = f"backbone.layers.{i}."
        shapes |= {
            layer + "gamma_1": (D,),
            layer + "gamma_2": (D,),
            layer + "ln1.weight": (D,),
            layer + "ln1.bias": (D,),
            layer + "attn.relative_position_bias_table": (rows, HEADS),
            layer + "attn.relative_position_index": (tokens, tokens),
            layer + "attn.qkv.weight": (3 * D, D),
            layer + "attn.proj.weight": (D, D),
            layer + "attn.proj.bias": (D,),
            layer + "ln2.weight": (D,),
            layer + "ln2.bias": (D,),
            layer + "ffn.layers.0.0.weight": (4 * D, D),
            layer + "ffn.layers.0.0.bias": (4 * D,),
            layer + "ffn.layers.1.weight": (D, 4 * D),
            layer + "ffn.layers.1.bias": (D,),
        }
        if qv_bias:
            shapes |= {layer + "attn.q_bias": (D,), layer + "attn.v_bias": (D,)}
        else:
            shapes |= {layer + "attn.qkv.bias": (3 * D,)}

    def bn(prefix, n):
        names = ("weight", "bias", "running_mean", "running_var")
        return {f"{prefix}.{name}": (n,) for name in names} | {f"{prefix}.num_batches_tracked": ()}

    def conv_module(prefix, cin, cout, k):
        return {f"{prefix}.conv.weight": (cout, cin, k, k)} | bn(f"{prefix}.bn", cout)

    shapes |= {
        "neck.upsample_4x.0.weight": (D, D, 2, 2),  # ConvTranspose2d: [in, out, kh, kw]
        "neck.upsample_4x.0.bias": (D,),
        **bn("neck.upsample_4x.1", D),
        "neck.upsample_4x.3.weight": (D, D, 2, 2),
        "neck.upsample_4x.3.bias": (D,),
        "neck.upsample_2x.0.weight": (D, D, 2, 2),
        "neck.upsample_2x.0.bias": (D,),
    }
    for i in range(4):  # pool scales 1, 2, 3, 6
        shapes |= conv_module(f"decode_head.psp_modules.{i}.1", D, C, 1)
    shapes |= conv_module("decode_head.bottleneck", D + 4 * C, C, 3)
    for i in range(3):
        shapes |= conv_module(f"decode_head.lateral_convs.{i}", D, C, 1)
        shapes |= conv_module(f"decode_head.fpn_convs.{i}", C, C, 3)
    shapes |= conv_module("decode_head.fpn_bottleneck", 4 * C, C, 3)
    shapes |= {"decode_head.conv_seg.weight": (K, C, 1, 1), "decode_head.conv_seg.bias": (K,)}
    shapes |= conv_module("auxiliary_head.convs.0", D, AUX, 3)
    shapes |= {
        "auxiliary_head.conv_seg.weight": (K, AUX, 1, 1),
        "auxiliary_head.conv_seg.bias": (K,),
    }
    return shapes


# --------------------------------------------------------------------------- torch reference
def beit_relative_position_index(wh, ww):
    """mmseg BEiTAttention._init_rel_pos_embedding's buffer."""
    coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    num = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.zeros(size=(wh * ww + 1,) * 2, dtype=rel.dtype)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num - 3
    index[0:, 0] = num - 2
    index[0, 0] = num - 1
    return index


class BEiTAttention(nn.Module):
    """mmseg's attention: qkv Linear (full bias, or BEiT's q_bias / v_bias and no key bias),
    relative position bias table indexed by a buffer."""

    def __init__(self, qv_bias):
        super().__init__()
        self.qv_bias = qv_bias
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(D))
            self.v_bias = nn.Parameter(torch.zeros(D))
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * GRID - 1) ** 2 + 3, HEADS)
        )
        self.register_buffer("relative_position_index", beit_relative_position_index(GRID, GRID))
        self.qkv = nn.Linear(D, 3 * D, bias=not qv_bias)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        b, n, c = x.shape
        if self.qv_bias:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        attn = (q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)
        rel = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + rel.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class EncoderLayer(nn.Module):
    def __init__(self, qv_bias):
        super().__init__()
        self.ln1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = BEiTAttention(qv_bias)
        self.ln2 = nn.LayerNorm(D, eps=1e-6)
        self.ffn = nn.Module()  # mmcv FFN: layers = [[Linear, GELU, Dropout], Linear, Dropout]
        self.ffn.layers = nn.Sequential(
            nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Dropout(0.0)),
            nn.Linear(4 * D, D),
            nn.Dropout(0.0),
        )
        self.gamma_1 = nn.Parameter(torch.ones(D))
        self.gamma_2 = nn.Parameter(torch.ones(D))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.ln1(x))
        return x + self.gamma_2 * self.ffn.layers(self.ln2(x))


class MAEBackbone(nn.Module):
    """mmseg MAE backbone forward (with_cls_token, final_norm=False), out_indices (0..3)."""

    def __init__(self, qv_bias):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.projection = nn.Conv2d(3, D, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, GRID * GRID + 1, D))
        self.layers = nn.ModuleList([EncoderLayer(qv_bias) for _ in range(DEPTH)])

    def forward(self, images):
        x = self.patch_embed.projection(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x[:, 1:].reshape(x.shape[0], GRID, GRID, D).permute(0, 3, 1, 2))
        return outs


class TorchSegmentor(nn.Module):
    def __init__(self, qv_bias=False):
        super().__init__()
        self.backbone = MAEBackbone(qv_bias)
        heads = ref.UPerNetHeads(D, C, AUX, K)
        self.neck, self.decode_head, self.auxiliary_head = (
            heads.neck, heads.decode_head, heads.auxiliary_head
        )
        self._heads = [heads]  # a list: not registered twice in state_dict()

    def forward(self, images):
        return self._heads[0](self.backbone(images))


def torch_segmentor(qv_bias=False, seed=0):
    """Random weights everywhere (BN running statistics included), eval mode."""
    torch.manual_seed(seed)
    model = TorchSegmentor(qv_bias)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                scale_like = name.endswith(("gamma_1", "gamma_2", "ln1.weight", "ln2.weight"))
                tensor.copy_(float(scale_like) + 0.2 * torch.randn_like(tensor))
    return model.eval()


def save_checkpoint(model, path):
    torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": tuple("abcde")}}, path)
    return path


def numpy_state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@nnx.jit
def run(model, images):
    return model(images, train=False)  # running statistics, no dropout


def run_both(torch_model, segmenter, seed=1):
    images = np.random.default_rng(seed).normal(size=(2, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        want, want_aux = torch_model(torch.from_numpy(images))
    got, got_aux = run(segmenter, jnp.asarray(images.transpose(0, 2, 3, 1)))
    return (np.asarray(got), want.numpy().transpose(0, 2, 3, 1)), (
        np.asarray(got_aux), want_aux.numpy().transpose(0, 2, 3, 1)
    )


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("qv_bias", [False, True])
def test_reference_has_exactly_mmseg_keys_and_shapes(qv_bias):
    got = {k: tuple(v.shape) for k, v in TorchSegmentor(qv_bias).state_dict().items()}
    assert got == expected_mmseg_shapes(qv_bias)


def oihw(kernel):  # Flax conv HWIO -> PyTorch OIHW
    return np.asarray(kernel[...]).transpose(3, 2, 0, 1)


def deconv(kernel):  # Flax ConvTranspose [kh, kw, in, out], applied flipped -> [in, out, kh, kw]
    return np.asarray(kernel[...])[::-1, ::-1].transpose(2, 3, 0, 1)


def weights(module):
    return dict(nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))))


def test_every_tensor_lands_in_its_leaf_with_its_layout(tmp_path):
    model = torch_segmentor()
    segmenter = build_segmenter()
    mmseg.load_mmseg(segmenter, save_checkpoint(model, tmp_path / "upernet.pth"))
    sd, bb = numpy_state(model), segmenter.backbone
    neck, decode, aux = (segmenter.heads.neck, segmenter.heads.decode_head,
                         segmenter.heads.auxiliary_head)
    pairs = [  # (mmseg key, Flax leaf converted to PyTorch layout by hand)
        ("backbone.patch_embed.projection.weight", oihw(bb.patch_embed.proj.kernel)),
        ("backbone.pos_embed", bb.pos_embed[...]),
        ("backbone.layers.2.attn.qkv.weight", bb.blocks[2].attn.qkv.kernel[...].T),
        ("backbone.layers.2.attn.qkv.bias", bb.blocks[2].attn.qkv.bias[...]),
        ("backbone.layers.0.attn.relative_position_bias_table",
         bb.blocks[0].attn.relative_position_bias_table[...]),
        ("backbone.layers.1.ffn.layers.1.weight", bb.blocks[1].mlp.fc2.kernel[...].T),
        ("backbone.layers.3.ffn.layers.0.0.bias", bb.blocks[3].mlp.fc1.bias[...]),
        ("backbone.layers.3.gamma_2", bb.blocks[3].gamma_2[...]),
        ("backbone.layers.0.ln2.weight", bb.blocks[0].norm2.scale[...]),
        ("neck.upsample_4x.0.weight", deconv(neck.up4_deconv1.kernel)),
        ("neck.upsample_2x.0.weight", deconv(neck.up2_deconv.kernel)),
        ("neck.upsample_4x.1.running_mean", neck.up4_norm.mean[...]),
        ("decode_head.psp_modules.3.1.bn.running_var", decode.psp_modules.convs[3].bn.var[...]),
        ("decode_head.lateral_convs.1.conv.weight", oihw(decode.lateral_convs[1].conv.kernel)),
        ("decode_head.fpn_bottleneck.bn.weight", decode.fpn_bottleneck.bn.scale[...]),
        ("decode_head.conv_seg.weight", oihw(decode.classifier.conv_seg.kernel)),
        ("auxiliary_head.convs.0.bn.bias", aux.conv.bn.bias[...]),
        ("auxiliary_head.conv_seg.bias", aux.classifier.conv_seg.bias[...]),
    ]
    for key, leaf in pairs:
        np.testing.assert_array_equal(np.asarray(leaf), sd[key], err_msg=key)
    # Every parameter and running statistic was overwritten, except the unused final norm.
    fresh = weights(build_segmenter())
    for path, variable in weights(segmenter).items():
        same = np.array_equal(variable[...], fresh[path][...])
        assert same == (path in mmseg.FINAL_NORM), path


@pytest.mark.parametrize("qv_bias", [False, True])
def test_loaded_segmenter_computes_the_torch_model(tmp_path, qv_bias):
    model = torch_segmentor(qv_bias)
    segmenter = build_segmenter()
    mmseg.load_mmseg(segmenter, save_checkpoint(model, tmp_path / "upernet.pth"))
    for got, want in run_both(model, segmenter):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_qv_bias_attention_equals_ours_with_a_zero_key_bias():
    model = torch_segmentor(qv_bias=True)
    leaves = mmseg.read_mmseg(model.state_dict())
    bias = leaves[("backbone", "blocks", 0, "attn", "qkv", "bias")]
    np.testing.assert_array_equal(bias[D : 2 * D], 0.0)
    segmenter = build_segmenter()
    mmseg.load_mmseg(segmenter, model.state_dict())
    x = np.random.default_rng(2).normal(size=(2, GRID * GRID + 1, D)).astype(np.float32)
    with torch.no_grad():
        want = model.backbone.layers[0].attn(torch.from_numpy(x)).numpy()
    got = segmenter.backbone.blocks[0].attn(jnp.asarray(x))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # And a key bias really is invisible: any value gives the same output.
    attn = segmenter.backbone.blocks[0].attn
    attn.qkv.bias[...] = attn.qkv.bias[...].at[D : 2 * D].set(3.0)
    np.testing.assert_allclose(attn(jnp.asarray(x)), want, atol=1e-5, rtol=1e-5)


def test_export_round_trip_is_exact_and_loads_into_torch(tmp_path):
    model = torch_segmentor()
    want = numpy_state(model)
    segmenter = build_segmenter()
    mmseg.load_mmseg(segmenter, save_checkpoint(model, tmp_path / "in.pth"))
    exported = mmseg.export_mmseg(segmenter)
    assert {k: v.shape for k, v in exported.items()} == expected_mmseg_shapes()
    for key, value in want.items():
        assert exported[key].dtype == value.dtype, key  # float32, int64 buffers
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    mmseg.save_mmseg(segmenter, tmp_path / "out.pth", meta={"CLASSES": tuple("abcde")})
    checkpoint = torch.load(tmp_path / "out.pth", weights_only=True)
    assert checkpoint["meta"]["CLASSES"] == tuple("abcde")
    # Contiguous tensors, as safetensors and other writers require (review).
    assert all(value.is_contiguous() for value in checkpoint["state_dict"].values())
    again = TorchSegmentor().eval()
    again.load_state_dict(checkpoint["state_dict"], strict=True)
    for got, expected in run_both(again, segmenter):
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


def test_one_error_names_every_missing_unexpected_and_misshaped_key():
    state = dict(torch_segmentor().state_dict())
    del state["backbone.layers.1.gamma_1"]
    state["decode_head.conv_cat.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        mmseg.load_mmseg(build_segmenter(num_classes=7), {"state_dict": state})
    message = str(error.value)
    assert "missing keys (1): backbone.layers.1.gamma_1" in message
    assert "unexpected keys (1): decode_head.conv_cat.weight" in message
    assert "decode_head.conv_seg.weight: checkpoint (5, 16, 1, 1) vs model (7, 16, 1, 1)" in message
    assert "auxiliary_head.conv_seg.bias" in message
    # The hint gives the checkpoint's own sizes (was: the published ViT-B model's).
    assert (f"like the checkpoint's model (width {D}, patch {PATCH}, depth {DEPTH}, image_size "
            f"{IMAGE}, num_classes 5, channels {C}, aux_channels {AUX};") in message


def test_other_grid_is_refused_with_the_tables_and_index_named():
    state = torch_segmentor().state_dict()
    with pytest.raises(ValueError) as error:
        mmseg.load_mmseg(build_segmenter(image_size=48), state)
    message = str(error.value)
    assert "backbone.pos_embed: checkpoint (1, 65, 32) vs model (1, 145, 32)" in message
    assert "backbone.layers.0.attn.relative_position_bias_table" in message
    assert "relative_position_index" in message


def test_final_norm_is_read_with_a_warning_and_exported_on_request():
    state = dict(torch_segmentor().state_dict())
    state["backbone.ln1.weight"] = torch.full((D,), 2.0)
    state["backbone.ln1.bias"] = torch.full((D,), 0.5)
    segmenter = build_segmenter()
    with pytest.warns(UserWarning, match="final norm"):
        mmseg.load_mmseg(segmenter, state)
    np.testing.assert_array_equal(segmenter.backbone.norm.scale[...], 2.0)
    assert "backbone.ln1.weight" not in mmseg.export_mmseg(segmenter)
    exported = mmseg.export_mmseg(segmenter, final_norm=True)
    np.testing.assert_array_equal(exported["backbone.ln1.bias"], 0.5)


def test_loads_into_an_abstract_segmenter_as_segment_py_would():
    """segment.py can fill `nnx.eval_shape(build)` (no random init of a ViT-B) and copy the
    loaded leaves into its sharded state: all but the unused final norm become arrays."""
    model = torch_segmentor()
    concrete, abstract = build_segmenter(), nnx.eval_shape(build_segmenter)
    mmseg.load_mmseg(concrete, model.state_dict())
    mmseg.load_mmseg(abstract, model.state_dict())
    want = weights(concrete)
    for path, variable in weights(abstract).items():
        value = variable.get_value()
        if path in mmseg.FINAL_NORM:
            assert isinstance(value, jax.ShapeDtypeStruct)
        else:
            np.testing.assert_array_equal(value, want[path][...], err_msg=str(path))


def test_is_mmseg_checkpoint_tells_it_from_an_official_mae_file(tmp_path):
    path = save_checkpoint(torch_segmentor(), tmp_path / "upernet.pth")
    assert mmseg.is_mmseg_checkpoint(path) and mmseg.is_mmseg_checkpoint(torch.load(path))
    torch.save({"model": {"cls_token": torch.zeros(1, 1, D)}}, tmp_path / "mae.pth")
    assert not mmseg.is_mmseg_checkpoint(tmp_path / "mae.pth")
    assert not mmseg.is_mmseg_checkpoint(tmp_path / "absent.pth")


def test_read_mmseg_refuses_foreign_keys_and_maps_old_neck_names():
    state = {k: v for k, v in torch_segmentor().state_dict().items() if k.startswith("neck.")}
    renamed = {k.replace("neck.upsample_4x.", "backbone.fpn1."): v for k, v in state.items()}
    leaves = mmseg.read_mmseg({"state_dict": renamed})
    assert ("heads", "neck", "up4_norm", "var") in leaves
    with pytest.raises(ValueError, match="backbone.foo"):
        mmseg.read_mmseg({"backbone.foo": torch.zeros(1)})
