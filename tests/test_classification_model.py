"""The classifier (official models_vit.VisionTransformer) and its optimiser groups, without data.

The PyTorch reference below is the official `models_vit.VisionTransformer.forward_features`
(+ `head`, and main_linprobe.py's BatchNorm head) written out over the plain-torch timm blocks of
`mae_jax.reference`; `param_groups_lrd` is the official `util/lr_decay.py` written out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch import nn

from mae_jax.classification import finetune, linprobe, transfer
from mae_jax.core import optim
from mae_jax.core.state import TrainState
from mae_jax.core.step import make_train_step
from mae_jax.models.classifier import ViTClassifier
from mae_jax.reference.torch_vit import Block, PatchEmbed

TINY = dict(variant="vit_tiny_patch16", image_size=16, patch_size=4, embed_dim=32, depth=2,
            num_heads=2, num_classes=7)


def tiny(global_pool=True, **changes):
    return ViTClassifier(**(TINY | {"global_pool": global_pool} | changes), rngs=nnx.Rngs(0))


class TorchModelsVit(nn.Module):
    """models_vit.VisionTransformer (timm 0.3.2 base) with global_pool; the probe variant wraps
    the head as main_linprobe.py does: Sequential(BatchNorm1d(affine=False, eps=1e-6), head)."""

    def __init__(self, *, img_size, patch_size, embed_dim, depth, num_heads, num_classes,
                 global_pool):
        super().__init__()
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head = nn.Linear(embed_dim, num_classes)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head = nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6),
                                      nn.Linear(embed_dim, num_classes))

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        if self.global_pool:
            return self.head(self.fc_norm(x[:, 1:, :].mean(dim=1)))
        return self.head(self.norm(x)[:, 0])


def torch_twin(model: ViTClassifier) -> TorchModelsVit:
    twin = TorchModelsVit(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                          num_classes=7, global_pool=model.global_pool)
    if model.global_pool:
        state = transfer.export_official_classifier(model)
    else:  # the probe: encoder keys + the official head.1 Linear (BatchNorm has no weights)
        from mae_jax.weights.official import export_official

        state = export_official(model.encoder)
        state["head.1.weight"] = np.asarray(model.head.kernel[...]).T
        state["head.1.bias"] = np.asarray(model.head.bias[...])
    missing, unexpected = twin.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    assert not unexpected and all("running" in k or "batches" in k for k in missing)
    return twin


def images(n=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype(np.float32)


def test_fine_tuning_classifier_matches_official_models_vit_with_global_pool():
    model = tiny()
    # Non-trivial head and fc_norm, so the comparison sees them.
    model.head.kernel[...] = jax.random.normal(jax.random.PRNGKey(1), model.head.kernel.shape)
    model.fc_norm.scale[...] = 1.5 + model.fc_norm.scale[...]
    x = images()
    with torch.no_grad():
        expected = torch_twin(model).eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), expected, atol=2e-5, rtol=1e-4)


def test_probe_head_matches_official_batchnorm_in_train_and_eval_mode():
    model = tiny(global_pool=False)
    model.head.kernel[...] = jax.random.normal(jax.random.PRNGKey(1), model.head.kernel.shape)
    twin = torch_twin(model)
    x, nchw = images(), torch.from_numpy(images()).permute(0, 3, 1, 2)
    with torch.no_grad():
        train_logits = twin.train()(nchw).numpy()  # batch statistics; updates running stats
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(x), train=True)), train_logits,
                                   atol=5e-5, rtol=1e-4)
        bn = twin.head[0]
        # torch momentum 0.1 == flax momentum 0.9; both running statistics are torch's (the
        # variance updated with the unbiased batch variance, as BatchNorm1d).
        np.testing.assert_allclose(np.asarray(model.head_norm.mean[...]),
                                   bn.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(model.head_norm.var[...]),
                                   bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
        eval_logits = twin.eval()(nchw).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), eval_logits, atol=5e-5,
                               rtol=1e-4)


def test_heads_start_as_the_official_scripts_initialise_them():
    # timm's trunc_normal_(std=s) truncates at +-2 absolute: a plain normal for s << 1.
    probe = ViTClassifier(**(TINY | {"embed_dim": 192, "num_heads": 3, "num_classes": 1000}),
                          global_pool=False, rngs=nnx.Rngs(0))
    kernel = np.asarray(probe.head.kernel[...])
    assert kernel.std() == pytest.approx(0.01, rel=0.02)
    assert np.abs(kernel).max() > 3.5 * 0.01  # not truncated at 2 standard deviations
    assert not np.asarray(probe.head.bias[...]).any()
    model = tiny()
    assert np.asarray(model.head.kernel[...]).std() == pytest.approx(2e-5, rel=0.2)
    assert model.encoder.norm is None  # models_vit deletes `norm` with global pooling


def test_official_finetuned_layout_round_trips_through_a_pth_file(tmp_path):
    model = tiny()
    state = transfer.export_official_classifier(model)
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    expected |= {f"blocks.{i}.{name}.{kind}" for i in range(2) for kind in ("weight", "bias")
                 for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")}
    assert set(state) == expected
    assert state["head.weight"].shape == (7, 32)  # torch Linear layout [out, in]
    path = transfer.save_official_classifier(model, str(tmp_path / "mae_finetuned.pth"))
    written = torch.load(path, weights_only=True)["model"]
    assert all(value.is_contiguous() for value in written.values())  # as safetensors needs
    loaded = transfer.load_official_classifier(path, num_heads=2)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param).to_pure_dict(),
                 nnx.state(loaded, nnx.Param).to_pure_dict())
    # A pretrained encoder is not a classifier: a clear error.
    del state["head.weight"]
    with pytest.raises(ValueError, match="init_from"):
        transfer.load_official_classifier(state, num_heads=2)


def param_groups_lrd(named_params, weight_decay=0.05, no_weight_decay_list=(), layer_decay=.75,
                     num_blocks=2):
    """The official util/lr_decay.py over (name, ndim) pairs: {name: (lr_scale, wd)}."""
    num_layers = num_blocks + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

    def layer_id(name):
        if name in ["cls_token", "pos_embed"]:
            return 0
        if name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        return num_layers

    return {n: (layer_scales[layer_id(n)],
                0.0 if ndim == 1 or n in no_weight_decay_list else weight_decay)
            for n, ndim in named_params}


@pytest.mark.parametrize("variant,depth", [("vit_tiny_patch16", 2), ("vit_base_patch16", 12)])
def test_fine_tuning_groups_match_the_official_param_groups_lrd(variant, depth):
    kwargs = TINY if depth == 2 else {"variant": variant, "num_classes": 1000}
    model = nnx.eval_shape(lambda: ViTClassifier(**kwargs, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    scales = optim.layer_decay_scales(params, decay=0.65, depth=depth, prefix=("encoder",))
    mask = optim.weight_decay_mask(params, no_decay_names=finetune.NO_WEIGHT_DECAY)
    from mae_jax.weights.official import official_key

    ours = {}
    for (path, scale), (_, decay) in zip(nnx.to_flat_state(scales), nnx.to_flat_state(mask),
                                         strict=True):
        ours[official_key(path)] = (scale.get_value(), 0.05 if decay.get_value() else 0.0)
    named = [(official_key(p), len(v.get_value().shape)) for p, v in nnx.to_flat_state(params)]
    # timm 0.3.2 VisionTransformer.no_weight_decay() = {'pos_embed', 'cls_token'}.
    expected = param_groups_lrd(named, 0.05, {"pos_embed", "cls_token"}, 0.65, depth)
    assert ours.keys() == expected.keys()
    for name in expected:
        assert ours[name] == pytest.approx(expected[name], rel=1e-12), name
    assert expected["patch_embed.proj.weight"][0] == pytest.approx(0.65 ** (depth + 1))


def _step_flops(trainable, create_tx, loss_fn, model):
    graphdef, _, _ = nnx.split(model, trainable, ...)
    params = nnx.state(model, trainable)
    tx = create_tx(params)
    state = TrainState.create(model, tx, rng_seed=0, trainable=trainable)
    step = make_train_step(graphdef, loss_fn, tx, optax.constant_schedule(0.1),
                           trainable=trainable)
    batch = {"image": jnp.zeros((8, 16, 16, 3), jnp.uint8), "label": jnp.zeros(8, jnp.int32)}
    return jax.jit(step).lower(state, batch).compile().cost_analysis()["flops"], step, state


def test_the_probe_step_never_differentiates_the_frozen_encoder():
    from mae_jax.data.constants import normalize_uint8

    def forward_flops(model):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(normalize_uint8(x), train=False))
        return fn.lower(state, jnp.zeros((8, 16, 16, 3), jnp.uint8)).compile().cost_analysis()[
            "flops"]

    probe = tiny(global_pool=False)
    probe_loss = linprobe.make_loss_fn(None, 7)
    probe_flops, step, state = _step_flops(
        linprobe.TRAINABLE, lambda p: optax.sgd(0.1), probe_loss, probe)
    all_flops, _, _ = _step_flops(nnx.Param, lambda p: optax.sgd(0.1), probe_loss,
                                  tiny(global_pool=False))
    forward = forward_flops(tiny(global_pool=False))
    # A backward pass costs about twice the forward; the probe's step is the forward alone.
    assert probe_flops < 1.3 * forward < 0.6 * all_flops
    assert {p for p, _ in nnx.to_flat_state(state.params)} == {("head", "bias"),
                                                                ("head", "kernel")}
    # One step: the head and the BatchNorm statistics move, the encoder does not.
    batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3)),
                                  jnp.uint8), "label": jnp.arange(8) % 7}
    new_state, metrics = jax.jit(step)(state, batch)
    before, after = dict(nnx.to_flat_state(state.rest)), dict(nnx.to_flat_state(new_state.rest))
    for path in before:
        same = np.array_equal(before[path].get_value(), after[path].get_value())
        assert same == (path[0] == "encoder"), path
    assert not np.array_equal(state.params["head"]["kernel"].get_value(),
                              new_state.params["head"]["kernel"].get_value())
    assert np.isfinite(float(metrics["loss"]))


def test_an_encoder_of_another_kind_is_refused_not_cut_to_fit(tmp_path):
    """transfer_encoder (what init_from uses): a deeper source, or one with trained layer-scale
    / relative-position weights, is refused naming the weights left over, not silently cut; a
    plain source of the same size is copied, and only the final norm may be left over (global
    pooling has no place for it). A segmenter file read as an encoder names its first
    non-array entry."""
    from mae_jax.core.errors import WeightsError
    from mae_jax.models.vit import ViTEncoder
    from mae_jax.weights.load import load_encoder, transfer_encoder

    kwargs = dict(image_size=16, patch_size=4, embed_dim=16, num_heads=2)
    target = ViTEncoder(depth=2, **kwargs, rngs=nnx.Rngs(0))
    deeper = ViTEncoder(depth=3, **kwargs, rngs=nnx.Rngs(1))
    with pytest.raises(WeightsError, match=r"has \d+ trained weight\(s\) .*blocks\.2\."):
        transfer_encoder(deeper, target)
    extended = ViTEncoder(depth=2, **kwargs, relative_position_bias=True, layer_scale_init=1.0,
                          rngs=nnx.Rngs(1))
    with pytest.raises(WeightsError, match="gamma_1"):
        transfer_encoder(extended, target)
    same = ViTEncoder(depth=2, **kwargs, rngs=nnx.Rngs(2))
    assert len(transfer_encoder(same, target)) == len(nnx.to_flat_state(nnx.state(target)))
    np.testing.assert_array_equal(target.cls_token.get_value(), same.cls_token.get_value())

    # Another width, read from an official file: the sizes and the file. A file of this code
    # records its head count, which is then checked (QA: it was ignored); an official file
    # records none, and lends its weights to a model of any head count.
    from mae_jax.weights.load import copy_encoder_from
    from mae_jax.weights.official import save_official

    save_official(ViTEncoder(depth=2, **(kwargs | {"embed_dim": 20, "num_heads": 5}),
                             rngs=nnx.Rngs(1)), tmp_path / "wider.pth")
    with pytest.raises(WeightsError, match=r"start from .*wider\.pth: The source encoder is "
                                           r"width 20, patch 4, depth 2; the model is width 16"):
        copy_encoder_from(tmp_path / "wider.pth", target)
    four_heads = ViTEncoder(depth=2, **(kwargs | {"embed_dim": 20, "num_heads": 4}),
                            rngs=nnx.Rngs(0))
    with pytest.raises(WeightsError, match="has 5 attention heads, the model 4"):
        copy_encoder_from(tmp_path / "wider.pth", four_heads)
    five_heads = ViTEncoder(depth=2, **(kwargs | {"embed_dim": 20, "num_heads": 5}),
                            rngs=nnx.Rngs(0))
    assert len(copy_encoder_from(tmp_path / "wider.pth", five_heads)) == len(
        nnx.to_flat_state(nnx.state(five_heads)))
    unrecorded = {"model": torch.load(tmp_path / "wider.pth", weights_only=True)["model"]}
    torch.save(unrecorded, tmp_path / "official_layout.pth")
    copied = copy_encoder_from(tmp_path / "official_layout.pth", four_heads)
    assert len(copied) == len(nnx.to_flat_state(nnx.state(four_heads)))

    path = tmp_path / "segmenter.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": {"backbone.cls_token": torch.zeros(1, 1, 16),
                                                     "decode_head.conv_seg.bias": torch.zeros(2),
                                                     "meta": {"classes": 2}}}, path)
    with pytest.raises(WeightsError, match="'meta' in the checkpoint is a dict, not an array"):
        load_encoder(path)


def test_official_training_checkpoints_with_their_args_load_and_code_is_still_refused(tmp_path):
    """The official main_pretrain.py / main_finetune.py save {"model", "optimizer", "epoch",
    "args": argparse.Namespace}: readable with weights_only=True once Namespace is allowed;
    any other class in the pickle is still refused."""
    import argparse
    import fractions

    from mae_jax.core.errors import WeightsError
    from mae_jax.weights.official import read_state_dict

    model = {"cls_token": torch.ones(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8)}
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": model, "optimizer": {}, "epoch": 799,
                "args": argparse.Namespace(lr=1.5e-4, model="mae_vit_base_patch16")}, path)
    state = read_state_dict(path)
    assert sorted(state) == ["cls_token", "pos_embed"] and state["cls_token"].sum() == 8
    other = tmp_path / "other.pth"
    torch.save({"model": model, "args": fractions.Fraction(1, 3)}, other)
    with pytest.raises(WeightsError, match="Refusing to load"):
        read_state_dict(other)
    # Not a checkpoint at all (QA: init_from=metrics.jsonl got torch's advice to retry with
    # weights_only=False, which would run whatever a pickle holds).
    notes = tmp_path / "metrics.jsonl"
    notes.write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(WeightsError, match="is not a PyTorch checkpoint") as error:
        read_state_dict(notes)
    assert "weights_only" not in str(error.value)


def test_weights_holding_nan_are_refused_at_load_naming_the_arrays():
    """Not trained on until they surface as a divergence (exit 3)."""
    from mae_jax.core.errors import WeightsError
    from mae_jax.models.vit import ViTEncoder
    from mae_jax.weights.load import transfer_encoder

    kwargs = dict(image_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    source = ViTEncoder(**kwargs, rngs=nnx.Rngs(1))
    kernel = source.blocks[0].mlp.fc1.kernel
    kernel.set_value(kernel.get_value().at[0, 0].set(jnp.nan))
    with pytest.raises(WeightsError, match=r"NaN or inf in 1 array\(s\): blocks\.0\.mlp\.fc1\."
                                           r"kernel"):
        transfer_encoder(source, ViTEncoder(**kwargs, rngs=nnx.Rngs(0)))


def test_a_finetuned_classifier_starts_finetuning_and_segmentation_but_not_a_probe(tmp_path):
    """An official mae_finetuned_vit_*.pth has no final `norm` (models_vit deletes it for global
    pooling): as init_from its encoder is copied into a fine-tuning classifier of other classes
    and into a segmenter's backbone (both leave that norm unused); the linear probe, which
    reads the cls token after `norm`, is refused saying the file is a fine-tuned classifier."""
    from mae_jax.core.errors import WeightsError
    from mae_jax.models.factory import ModelSpec
    from mae_jax.segmentation.lib import init_backbone
    from mae_jax.weights.load import load_encoder

    source = tiny()
    path = transfer.save_official_classifier(source, str(tmp_path / "mae_finetuned.pth"))
    dims = {k: v for k, v in TINY.items() if k != "num_classes"}
    other_classes = ModelSpec("ViTClassifier", dims | {"num_classes": 3, "global_pool": True})
    values = transfer.encoder_values(path, other_classes)
    assert ("encoder", "norm", "scale") not in values and len(values) == 28
    np.testing.assert_array_equal(values[("encoder", "blocks", 1, "mlp", "fc2", "kernel")],
                                  source.encoder.blocks[1].mlp.fc2.kernel.get_value())
    segmenter = ModelSpec("MAESegmenter", dims | {"num_classes": 5, "out_indices": [0, 1, 1, 1],
                                                  "channels": 8, "aux_channels": 8})
    backbone = init_backbone(path, segmenter)
    np.testing.assert_array_equal(backbone[("backbone", "cls_token")],
                                  source.encoder.cls_token.get_value())
    probe = ModelSpec("ViTClassifier", dims | {"num_classes": 7, "global_pool": False})
    with pytest.raises(WeightsError, match="no final norm: it is a fine-tuned classifier"):
        transfer.encoder_values(path, probe)
    encoder = load_encoder(path, num_heads=2)
    assert encoder.norm is None
    with pytest.raises(ValueError, match="apply_norm=False"):
        encoder(jnp.zeros((1, 16, 16, 3)))
    assert encoder(jnp.zeros((1, 16, 16, 3)), apply_norm=False)["patches"].shape == (1, 16, 32)
