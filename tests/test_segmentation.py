"""segment.py's library: short real runs (generated scenes, a fake ADE20K), resume after a kill,
pretrained backbones, eval-only, the demo learning, sharding invariance, bad configs."""

import io
import json
import os
import shutil
import zipfile

import jax
import numpy as np
import optax
import pytest
from conftest import (
    load_config_file,
    losses_of,
    one_worker,
    params_of,
    set_fields,
    sigterm_after_step,
    tiny_pretrain_config,
)
from conftest import tiny_segmentation_config as tiny_config
from flax import nnx
from PIL import Image

import mae_jax
from mae_jax.core.run_logging import read_metrics
from mae_jax.core.state import TrainState
from mae_jax.data.ade20k_meta import ADE20K_CLASSES
from mae_jax.models.pos_embed import resize_pos_embed
from mae_jax.pretrain import lib as pretrain_lib
from mae_jax.segmentation import config as segmentation_config
from mae_jax.segmentation import lib as segment_lib
from mae_jax.weights.load import load_encoder

pytestmark = one_worker(__name__)


@pytest.fixture(scope="module", autouse=True)
def _cache(shared_compilations):
    """Most tests here compile the same tiny model again: share compilations (conftest)."""


def run(config, workdir, num_devices=1):
    return segment_lib.train_and_evaluate(
        config, str(workdir), devices=jax.devices()[:num_devices]
    )


def flat_params(tree):
    if isinstance(tree, nnx.State):
        tree = tree.to_pure_dict()
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny config trained for 6 steps on 1 device; shared, so tests must not modify it."""
    workdir = tmp_path_factory.mktemp("finished")
    result = run(tiny_config(), workdir)
    return workdir, result


# --------------------------------------------------------------------------- Short runs
def test_short_run_logs_losses_saves_checkpoints_and_evaluates(finished_run):
    workdir, result = finished_run
    records = read_metrics(str(workdir))
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert {"loss", "decode_loss", "aux_loss", "lr", "grad_norm"} <= set(record)
        # The auxiliary FCN head adds with weight 0.4 (mmseg).
        assert record["loss"] == pytest.approx(record["decode_loss"] + 0.4 * record["aux_loss"])
        assert np.isfinite(record["loss"]) and record["lr"] > 0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    with open(workdir / "eval_results.json") as handle:
        saved = json.load(handle)
    assert {"aAcc", "mIoU", "mAcc", "per_class", "step"} <= set(saved)
    assert saved["step"] == 6 and result["step"] == 6
    assert saved["num_images"] == result["num_images"] == 2  # eval_limit=2
    for key in ("aAcc", "mIoU", "mAcc"):
        assert 0.0 <= saved[key] <= 100.0 and saved[key] == pytest.approx(result[key])
    assert list(saved["per_class"]) == [f"class_{index}" for index in range(4)]
    for scores in saved["per_class"].values():
        assert set(scores) == {"IoU", "Acc"}
    assert [r["step"] for r in read_metrics(str(workdir), kind="eval")] == [6]
    pictures = os.listdir(workdir / "images")
    assert len(pictures) == 1 and pictures[0].startswith("segmentation")
    # Two validation scenes of 24x24 drawn as image | prediction | ground truth, enlarged by
    # an integer factor to at least 768 px wide (readable; 72 px -> x10).
    picture = np.asarray(Image.open(workdir / "images" / pictures[0]))
    assert picture.shape[1] == 10 * 3 * 24 and picture.shape[0] >= 10 * 2 * 24


def _write_fake_ade20k(manual_dir):
    """ADEChallengeData2016 with 4 training and 2 validation pairs (labels 0..150, 0 = other)."""
    rng = np.random.default_rng(0)
    sizes = {("training", "ADE_train"): [(24, 40), (40, 24), (30, 30), (36, 52)],
             ("validation", "ADE_val"): [(28, 44), (20, 36)]}
    with zipfile.ZipFile(manual_dir / "ADEChallengeData2016.zip", "w") as archive:
        for (folder, prefix), shapes in sizes.items():
            for index, (height, width) in enumerate(shapes):
                label = np.kron(rng.integers(0, 151, (height // 4, width // 4)), np.ones((4, 4)))
                label = label.astype(np.uint8)
                image = np.stack([label, 255 - label, np.full_like(label, 128)], axis=-1)
                stem = f"{prefix}_{index + 1:08d}"
                for kind, name, array, form in (("images", f"{stem}.jpg", image, "JPEG"),
                                                ("annotations", f"{stem}.png", label, "PNG")):
                    encoded = io.BytesIO()
                    Image.fromarray(array).save(encoded, format=form)
                    archive.writestr(f"ADEChallengeData2016/{kind}/{folder}/{name}",
                                     encoded.getvalue())
        archive.writestr("ADEChallengeData2016/objectInfo150.txt", "Idx\tRatio\n")


def test_short_run_on_a_fake_ade20k_reports_the_150_classes(tmp_path):
    manual_dir = tmp_path / "download"
    manual_dir.mkdir()
    _write_fake_ade20k(manual_dir)
    config = tiny_config(**{
        "model.image_size": 32, "eval_window": 32, "eval_stride": 21, "data.source": "ade20k",
        "data.manual_dir": str(manual_dir), "data.data_dir": str(tmp_path / "tfds"),
        "data.scale": (64, 32), "data.num_classes": None, "total_steps": 2, "warmup_steps": 1,
        "eval_every_steps": 2, "checkpoint_every_steps": 2, "log_every_steps": 1,
    })
    result = run(config, tmp_path / "run")
    assert result["step"] == 2
    assert np.isfinite(losses_of(tmp_path / "run")[2])
    with open(tmp_path / "run" / "eval_results.json") as handle:
        saved = json.load(handle)
    assert list(saved["per_class"]) == list(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150
    assert 0.0 <= saved["aAcc"] <= 100.0
    # Classes absent from both prediction and labels have no IoU (NaN -> null in the JSON).
    assert any(scores["IoU"] is None for scores in saved["per_class"].values())


# --------------------------------------------------------------------------- Resume, eval-only
def test_killed_run_resumes_to_the_same_parameters_and_losses(finished_run, tmp_path):
    straight, _ = finished_run
    with sigterm_after_step(3):  # a real SIGTERM after step 3, as a pre-empted job gets
        first = run(tiny_config(), tmp_path)
        assert first["step"] == 3
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
        assert not os.path.exists(tmp_path / "eval_results.json")
    second = run(tiny_config(), tmp_path)
    assert second["step"] == 6
    # Dropout / drop-path keys come from fold_in(rng, step) and BatchNorm statistics live in
    # the checkpointed state, so the resumed run is the uninterrupted one, bit for bit.
    assert losses_of(straight) == losses_of(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params_of(straight), params_of(tmp_path))


def test_a_rerun_of_a_finished_run_reports_its_recorded_evaluation(finished_run, tmp_path):
    # E.g. a run killed between its last evaluation and its export: the re-run only exports,
    # and its result is the evaluation already written, not an empty "Done: {'step': 6}".
    finished, result = finished_run
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir)
    before = read_metrics(str(workdir), kind="eval")
    again = run(tiny_config(), workdir)
    assert read_metrics(str(workdir), kind="eval") == before  # not evaluated again
    assert again["step"] == 6 and again["num_images"] == 2
    for key in ("aAcc", "mIoU", "mAcc"):
        assert again[key] == pytest.approx(result[key])


def test_eval_only_evaluates_the_newest_checkpoint_without_training(finished_run, tmp_path):
    finished, result = finished_run
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir)
    os.remove(workdir / "eval_results.json")
    before = read_metrics(str(workdir))
    results = run(tiny_config(eval_only=True), workdir)
    assert results["step"] == 6
    with open(workdir / "eval_results.json") as handle:
        saved = json.load(handle)
    assert saved["step"] == 6
    assert saved["mIoU"] == pytest.approx(result["mIoU"]) and saved["aAcc"] == pytest.approx(
        result["aAcc"]
    )
    assert read_metrics(str(workdir)) == before  # no training step ran
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    with open(workdir / "eval_config.json") as handle:
        assert json.load(handle)["eval_only"] is True


# --------------------------------------------------------------------------- Pretrained backbones
def _capture_evaluated_params(monkeypatch):
    captured = {}
    original = segment_lib.Evaluator.__call__

    def evaluate(self, step, state):
        captured["params"] = jax.tree.map(np.asarray, state.params)
        return original(self, step, state)

    monkeypatch.setattr(segment_lib.Evaluator, "__call__", evaluate)
    return captured


def test_official_checkpoint_of_another_size_initialises_the_backbone(tmp_path, monkeypatch):
    # An MAE pretrained at 32x32 (8x8 patches), fine-tuned at 16x16 (4x4 patches).
    mae = mae_jax.MAE(
        image_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
        decoder_depth=1, decoder_num_heads=2, rngs=nnx.Rngs(5),
    )
    path = tmp_path / "mae_pretrain_tiny.pth"
    mae_jax.save_official(mae.encoder, path)
    captured = _capture_evaluated_params(monkeypatch)
    run(tiny_config(init_from=str(path), eval_only=True), tmp_path / "run")
    backbone = captured["params"]["backbone"]

    expected = resize_pos_embed(np.asarray(mae.encoder.pos_embed[...]), 4)
    np.testing.assert_allclose(backbone["pos_embed"], expected, rtol=1e-6, atol=1e-7)
    pretrained = flat_params(nnx.state(mae.encoder, nnx.Param))
    loaded = flat_params(backbone)
    assert set(pretrained) <= set(loaded)
    for key, value in pretrained.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    gammas = [key for key in loaded if "gamma_" in key]
    assert len(gammas) == 4  # not in MAE checkpoints: they stay at mmseg's init, 1.0
    for key in gammas:
        np.testing.assert_array_equal(loaded[key], 1.0)


def test_train_py_workdir_initialises_the_backbone(tmp_path):
    mae_config = tiny_pretrain_config(
        **{"model.decoder_embed_dim": 16, "data.source": "generated:16",
           "data.shuffle_buffer_size": 16, "batch_size": 4, "total_steps": 2,
           "warmup_steps": 1, "log_every_steps": 1, "checkpoint_every_steps": 2,
           "visualize_every_steps": 0}
    )
    pretrain_lib.train_and_evaluate(mae_config, str(tmp_path / "mae"), devices=jax.devices()[:1])
    encoder = load_encoder(str(tmp_path / "mae"))

    config = tiny_config(init_from=str(tmp_path / "mae"))
    spec = segment_lib.model_spec(config, 4)
    model = spec.build()
    state = TrainState.create(model, optax.identity(), rng_seed=0)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, state)
    state, whole = segment_lib.initialise(config, spec, state, shardings)
    assert not whole  # a pretraining run holds an encoder: the heads keep their init
    params = state.params
    loaded = flat_params(params["backbone"])
    pretrained = flat_params(nnx.state(encoder, nnx.Param))
    for key, value in pretrained.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    np.testing.assert_allclose(
        loaded["['pos_embed']"], np.asarray(encoder.pos_embed[...]), rtol=1e-6, atol=1e-7
    )
    assert all(leaf.sharding == device for leaf in jax.tree.leaves(params["backbone"]))


@pytest.mark.parametrize("source", ["run", "mmseg"])
def test_whole_segmenter_from_a_run_or_its_mmseg_export_evaluates_the_same(
    finished_run, tmp_path, source
):
    """init_from a segment.py workdir, or the export/segmenter_mmseg.pth it wrote (mmseg's
    layout, as the published MAE UPerNet checkpoint): the whole segmenter is loaded (BatchNorm
    statistics included), so eval_only reproduces the run's own final evaluation."""
    finished, result = finished_run
    init_from = finished if source == "run" else finished / "export" / "segmenter_mmseg.pth"
    assert os.path.isfile(finished / "export" / "segmenter_mmseg.pth")
    results = run(tiny_config(init_from=str(init_from), eval_only=True), tmp_path / "eval")
    assert results["mIoU"] == pytest.approx(result["mIoU"], abs=1e-4)
    assert results["aAcc"] == pytest.approx(result["aAcc"], abs=1e-4)


def test_segmenter_of_another_shape_is_refused_naming_what_differs(finished_run, tmp_path):
    finished, _ = finished_run
    with pytest.raises(ValueError, match="does not fit this config.*conv_seg"):
        run(tiny_config(init_from=str(finished), eval_only=True, **{"data.num_classes": 5}),
            tmp_path / "eval")


# --------------------------------------------------------------------------- Learning, sharding
@pytest.mark.slow
def test_demo_config_learns_the_generated_scenes(tmp_path):
    config = set_fields(load_config_file("seg_demo"), {
        "total_steps": 80, "warmup_steps": 8, "batch_size": 8, "eval_every_steps": 80,
        "checkpoint_every_steps": 80, "log_every_steps": 20, "data.eval_limit": 8,
        "tensorboard": False,
    })
    result = run(config, tmp_path)
    losses = losses_of(tmp_path)
    assert min(losses[60], losses[80]) < 0.7 * losses[20], losses
    # Chance is 1/6 of the pixels; the full demo reaches ~96.
    assert result["mIoU"] > 50, result


@pytest.mark.slow
def test_same_losses_on_1_and_4_devices(finished_run, tmp_path):
    one, _ = finished_run
    config = tiny_config(eval_every_steps=0)
    config.mesh.update(data=2, fsdp=2)  # the batch split 4 ways over both mesh axes
    run(config, tmp_path, num_devices=4)
    # BatchNorm statistics are global under GSPMD, so the split changes only the order of
    # reductions: losses agree to rounding. Parameters are not compared leaf by leaf: some get
    # exactly-zero gradients (e.g. the attention key bias), whose rounding noise, which depends
    # on the reduction order, Adam normalises into full +-lr steps.
    assert losses_of(one) == pytest.approx(losses_of(tmp_path), rel=1e-5)


# --------------------------------------------------------------------------- Bad configs
@pytest.mark.parametrize(
    "changes,message",
    [
        ({"model.image_size": 18, "eval_window": 18}, "not a multiple of the patch size 4"),
        ({"batch_size": 6}, "multiple of the 4 devices"),
        ({"warmup_steps": 6}, "warmup_steps 6 must be < total_steps 6"),
        ({"eval_window": 32}, "eval_window 32 must equal model.image_size 16"),
        ({"data.source": "cityscapes"}, "data.source 'cityscapes' must be"),
        ({"init_from": "/nowhere/mae_pretrain_vit_base.pth"}, "does not exist"),
        ({"model.out_indices": (0, 1, 2, 3)}, "must be 4 blocks < 2"),
        ({"model.image_size": 20, "eval_window": 20}, "must be even"),
        ({"eval_stride": 0}, r"eval_stride 0 must be in \[1, eval_window 16\]"),
        ({"eval_stride": 17}, "eval_stride 17 must be in .*cover the image"),
        ({"lr": 0.0}, "lr 0.0 must be > 0"),
        ({"min_lr": 1.0}, r"min_lr 1.0 must be in \[0, lr"),
        ({"layer_decay": 0.0}, r"layer_decay 0.0 must be in \(0, 1\]"),
        ({"aux_weight": -0.4}, "aux_weight -0.4 must be >= 0"),
        ({"model.dropout": 1.0}, r"model.dropout 1.0 must be in \[0, 1\)"),
        ({"model.channels": 0}, "model.channels 0 must be >= 1"),
        ({"data.ratio_range": (2.0, 0.5)}, "0 < low <= high"),
        ({"data.ratio_range": (0.5, 1.0, 2.0)}, r"must be two numbers \(low, high\)"),
        ({"data.num_examples": 2}, "data.num_examples 2 must be >= batch_size 4"),
        ({"data.num_classes": 0}, r"data.num_classes 0 must be in \[2, 254\]"),
        ({"mesh.data": 1, "mesh.fsdp": 3}, r"mesh.data=1 x mesh.fsdp=3 does not fit the 4 "),
        ({"mesh.data": -1, "mesh.fsdp": 3}, "does not fit the 4 devices.*at most one.*-1"),
        ({"data.source": "ade20k"}, "ADE20K has 150 classes; leave data.num_classes unset"),
    ],
)
def test_bad_configs_get_a_clear_error_before_any_work(changes, message):
    with pytest.raises(ValueError, match=message):
        segmentation_config.check_config(tiny_config(**{"mesh.data": -1} | changes),
                                         num_devices=4, num_processes=1)


def test_config_errors_are_reported_together():
    config = tiny_config(**{"batch_size": 6, "warmup_steps": 9, "data.source": "x",
                            "mesh.data": -1})
    with pytest.raises(ValueError) as error:
        segmentation_config.check_config(config, num_devices=4, num_processes=1)
    assert str(error.value).count("\n  - ") == 3


def test_missing_ade20k_data_fails_fast_and_says_where_to_get_it(tmp_path):
    config = segmentation_config.defaults()  # the published ViT-B recipe: nothing built first
    config.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="sceneparsing.csail.mit.edu") as error:
        segment_lib.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert "scene_parse150" in str(error.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
