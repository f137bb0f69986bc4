"""Hugging Face ViTMAE checkpoints: parity with `transformers.ViTMAEForPreTraining` / `ViTMAEModel`.

Reference: transformers' own models (CPU), with random weights on a tiny config, saved with
`save_pretrained` (safetensors) or as a `pytorch_model.bin` pickle in the published key layout,
read back with `mae_jax.load_official`; and our models written by `save_hf`, read by
`from_pretrained`. Both sides get the same images and the same masking noise.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from flax import nnx  # noqa: E402

import mae_jax  # noqa: E402
from mae_jax.core.errors import WeightsError  # noqa: E402
from mae_jax.weights import hf, official  # noqa: E402

CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    num_channels=3,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
    layer_norm_eps=1e-6,
)
NUM_PATCHES = 16
TOL = 1e-5


def perturbed(model, seed=0):
    """HF initialises Linears with std 0.02 and LayerNorms to (1, 0): too close to a constant
    function for a parity test, so every tensor (position tables too) gets O(0.1) noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def hf_pretraining(**overrides):
    config = transformers.ViTMAEConfig(**(CONFIG | overrides))
    return perturbed(transformers.ViTMAEForPreTraining(config))


def inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
    noise = rng.uniform(size=(batch, NUM_PATCHES)).astype(np.float32)
    return images, noise


def run_hf(model, images, noise):
    with torch.no_grad():
        out = model(torch.from_numpy(images), noise=torch.from_numpy(noise))
    return {
        "loss": out.loss.numpy(),
        "pred": out.logits.numpy(),
        "mask": out.mask.numpy(),
        "ids_restore": out.ids_restore.numpy(),
    }


def run_ours(model, images, noise, mask_ratio=0.75):
    out = model.forward(
        jnp.asarray(images.transpose(0, 2, 3, 1)), noise=jnp.asarray(noise), mask_ratio=mask_ratio
    )
    return {name: np.asarray(value) for name, value in out.items()}


def assert_same_outputs(ours, theirs, tol=TOL):
    np.testing.assert_array_equal(ours["mask"], theirs["mask"])
    np.testing.assert_array_equal(ours["ids_restore"], theirs["ids_restore"])
    np.testing.assert_allclose(ours["pred"], theirs["pred"], atol=tol, rtol=0)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], atol=tol, rtol=0)


def write_bin_folder(safetensors_folder, folder):
    """A `pytorch_model.bin` folder as published (transformers 5 only writes safetensors)."""
    os.makedirs(folder)
    tensors = safetensors_numpy.load_file(os.path.join(safetensors_folder, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "pytorch_model.bin")
    shutil.copy(os.path.join(safetensors_folder, "config.json"), folder / "config.json")


@pytest.mark.parametrize("fmt, norm_pix_loss", [("safetensors", False), ("bin", True)])
def test_loaded_checkpoint_matches_transformers(tmp_path, fmt, norm_pix_loss):
    reference = hf_pretraining(norm_pix_loss=norm_pix_loss)
    reference.save_pretrained(tmp_path / "safetensors")
    folder = tmp_path / "safetensors"
    if fmt == "bin":
        folder = tmp_path / "bin"
        write_bin_folder(tmp_path / "safetensors", folder)
    assert hf.is_hf_checkpoint(folder)
    model = mae_jax.load_official(folder)
    assert isinstance(model, mae_jax.MAE) and model.norm_pix_loss is norm_pix_loss
    images, noise = inputs()
    assert_same_outputs(run_ours(model, images, noise), run_hf(reference, images, noise))


def test_read_hf_official_keys_shapes_and_fused_qkv(tmp_path):
    reference = hf_pretraining()
    reference.save_pretrained(tmp_path)
    state, kwargs = hf.read_hf(tmp_path)
    assert kwargs == dict(
        embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, patch_size=8, image_size=32,
        in_chans=3, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
        norm_pix_loss=False,
    )
    built = mae_jax.MAE(**kwargs, rngs=nnx.Rngs(0))
    expected = {k: v.shape for k, v in official.export_official(built).items()}
    assert {k: v.shape for k, v in state.items()} == expected
    assert all(v.dtype == np.float32 for v in state.values())
    # Fused qkv = [q; k; v] along the output axis, in PyTorch [out, in] layout.
    attn = reference.vit.layers[1].attention
    want = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    np.testing.assert_array_equal(state["blocks.1.attn.qkv.weight"], want.numpy())
    dec = reference.decoder.decoder_layers[0]
    np.testing.assert_array_equal(state["decoder_blocks.0.mlp.fc2.bias"], dec.mlp.fc2.bias.detach())
    np.testing.assert_array_equal(state["norm.weight"], reference.vit.layernorm.weight.detach())


def test_lone_weights_file_and_in_memory_state_dict(tmp_path):
    """No config.json: heads come from the caller, the rest from the shapes. The in-memory
    transformers 5 names (`vit.layers.{i}.attention.q_proj`) are read too."""
    reference = hf_pretraining()
    reference.save_pretrained(tmp_path / "hf")
    os.makedirs(tmp_path / "alone")
    lone = tmp_path / "alone" / "weights.safetensors"
    shutil.copy(tmp_path / "hf" / "model.safetensors", lone)
    images, noise = inputs()
    want = run_hf(reference, images, noise)
    for source in (lone, reference.state_dict()):
        model = mae_jax.load_official(source, num_heads=2, decoder_num_heads=2)
        assert_same_outputs(run_ours(model, images, noise), want)


def test_encoder_only_vitmaemodel(tmp_path):
    config = transformers.ViTMAEConfig(**CONFIG)
    reference = perturbed(transformers.ViTMAEModel(config))
    reference.save_pretrained(tmp_path)
    keys = safetensors_numpy.load_file(str(tmp_path / "model.safetensors"))
    assert not any(k.startswith("vit.") for k in keys)  # ViTMAEModel files have no prefix
    encoder = mae_jax.load_official(tmp_path)
    assert isinstance(encoder, mae_jax.ViTEncoder)
    images, noise = inputs()
    with torch.no_grad():
        want = reference(torch.from_numpy(images), noise=torch.from_numpy(noise))
    tokens = encoder.embed(jnp.asarray(images.transpose(0, 2, 3, 1)))
    kept, mask, ids_restore = mae_jax.random_masking(tokens, jnp.asarray(noise), 0.75)
    latent, _ = encoder.encode(kept)
    np.testing.assert_allclose(latent, want.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_array_equal(mask, want.mask.numpy())
    np.testing.assert_array_equal(ids_restore, want.ids_restore.numpy())


def random_mae(norm_pix_loss=False):
    model = mae_jax.MAE(
        image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
        decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix_loss,
        rngs=nnx.Rngs(3),
    )
    # Zero-initialised biases / unit LayerNorms would hide a swapped weight: randomise them all.
    state = official.export_official(model)
    rng = np.random.default_rng(4)
    official.load_into(model, {k: v + 0.1 * rng.normal(size=v.shape) for k, v in state.items()})
    return model


def test_save_hf_round_trip_through_transformers(tmp_path):
    norm_pix_loss = True  # the flag must travel in config.json
    model = random_mae(norm_pix_loss)
    hf.save_hf(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded, info = transformers.ViTMAEForPreTraining.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert loaded.config.norm_pix_loss is norm_pix_loss
    images, noise = inputs(seed=5)
    assert_same_outputs(run_ours(model, images, noise), run_hf(loaded.eval(), images, noise))
    again = mae_jax.load_official(tmp_path)  # and back: identical weights
    for key, value in official.export_official(model).items():
        np.testing.assert_array_equal(official.export_official(again)[key], value, err_msg=key)


def test_save_hf_encoder_is_a_vitmaemodel(tmp_path):
    encoder = random_mae().encoder
    hf.save_hf(encoder, tmp_path)
    with open(tmp_path / "config.json") as handle:
        assert json.load(handle)["architectures"] == ["ViTMAEModel"]
    loaded, info = transformers.ViTMAEModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    images, noise = inputs()
    with torch.no_grad():
        want = loaded.eval()(torch.from_numpy(images), noise=torch.from_numpy(noise))
    tokens = encoder.embed(jnp.asarray(images.transpose(0, 2, 3, 1)))
    kept, _, _ = mae_jax.random_masking(tokens, jnp.asarray(noise), 0.75)
    np.testing.assert_allclose(
        encoder.encode(kept)[0], want.last_hidden_state.numpy(), atol=TOL, rtol=0
    )


def test_published_layer_norm_eps_is_accepted_and_close(tmp_path):
    """facebook/vit-mae-* configs carry eps 1e-12 (weights trained with 1e-6): accepted; the
    outputs differ by ~1e-5 (measured 1.3e-5 here), the eps difference, not a mapping error."""
    reference = hf_pretraining(layer_norm_eps=1e-12)
    reference.save_pretrained(tmp_path)
    model = mae_jax.load_official(tmp_path)
    images, noise = inputs()
    assert_same_outputs(run_ours(model, images, noise), run_hf(reference, images, noise), tol=1e-4)


def test_checkpoint_without_qkv_bias_gets_zero_biases(tmp_path):
    reference = hf_pretraining(qkv_bias=False)
    reference.save_pretrained(tmp_path)
    state, _ = hf.read_hf(tmp_path)
    np.testing.assert_array_equal(state["blocks.0.attn.qkv.bias"], np.zeros(3 * 32))
    images, noise = inputs()
    model = mae_jax.load_official(tmp_path)
    assert_same_outputs(run_ours(model, images, noise), run_hf(reference, images, noise))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_act", "gelu_new", "exact"),
        ("layer_norm_eps", 1e-5, "layer_norm_eps"),
        ("model_type", "vit", "vit_mae"),
        ("decoder_intermediate_size", 48, "mlp_ratio"),
    ],
)
def test_unsupported_config_is_refused(field, value, message):
    with pytest.raises(WeightsError, match=message):
        hf.config_to_kwargs(CONFIG | {field: value})


def test_a_damaged_folder_is_one_message_naming_the_file(tmp_path):
    """A truncated config.json or safetensors index (an interrupted download) is a
    WeightsError naming the file (exit 2), not a bare JSONDecodeError."""
    hf.save_hf(random_mae(), tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(WeightsError, match=r"config\.json is not valid JSON .*download it again"):
        hf.read_hf(tmp_path)
    config.write_text("[]")
    with pytest.raises(WeightsError, match="holds a JSON list, not an object"):
        hf.read_hf(tmp_path)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.parent.mkdir()
    index.write_text('{"metadata": {}}')
    with pytest.raises(WeightsError, match="has no weight_map"):
        hf.read_hf(index.parent)


def test_a_config_that_contradicts_its_weights_is_refused_naming_the_sizes(tmp_path):
    """transformers refuses a config.json whose sizes the weights contradict (pinned here);
    so do we, naming them (QA: another image_size was resized to silently, another
    hidden_size was blamed on decoder_intermediate_size)."""
    transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**CONFIG)).save_pretrained(
        tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in (({"image_size": 64}, r"image_size 64 \(64 patches; the position "
                             r"table: 16\).*image_size=\.\.\."),
                            ({"hidden_size": 64}, r"hidden_size 64 \(the weights: 32\)\. The "
                             r"files come from different checkpoints")):
        (tmp_path / "config.json").write_text(json.dumps(config | change))
        with pytest.raises((RuntimeError, ValueError), match="mismatch"):
            transformers.ViTMAEForPreTraining.from_pretrained(tmp_path)
        with pytest.raises(WeightsError, match=message):
            mae_jax.load_official(tmp_path)


def test_an_encoder_without_its_final_norm_is_not_exported_as_a_vitmaemodel(tmp_path):
    """A fine-tuned classifier's encoder (global pooling deletes `norm`): transformers would
    fill ViTMAEModel's final layernorm with fresh values, another function (QA)."""
    encoder = random_mae().encoder
    encoder.norm = None
    with pytest.raises(WeightsError, match="no final norm"):
        hf.save_hf(encoder, tmp_path)
    assert not os.listdir(tmp_path)


def test_official_pth_still_read_as_before_and_not_taken_for_hf(tmp_path):
    model = random_mae()
    path = tmp_path / "mae.pth"
    mae_jax.save_official(model, path)
    assert not hf.is_hf_checkpoint(path) and not hf.is_hf_checkpoint(tmp_path)
    again = mae_jax.load_official(str(path), num_heads=2, decoder_num_heads=2)
    images, noise = inputs()
    assert_same_outputs(run_ours(again, images, noise), run_ours(model, images, noise), tol=0)
