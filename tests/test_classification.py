"""linprobe.py / finetune.py libraries on generated textures: short real runs, the claims the
paper's evaluation rests on (a pretrained encoder probes better than a random one, fine-tuning
learns the task, k-NN accuracy rises with pretraining), export / eval / resume."""

import json
import os
import re
import shutil
import types

import jax
import numpy as np
import pytest
from conftest import (
    losses_of,
    one_worker,
    params_of,
    set_fields,
    sigterm_after_step,
    tiny_pretrain_config,
)
from flax import nnx

from mae_jax.classification import finetune, knn, linprobe
from mae_jax.classification.config import defaults
from mae_jax.classification.evaluation import read_results
from mae_jax.classification.synthetic import write_labelled_dataset
from mae_jax.core import sharding as sharding_lib
from mae_jax.core.run_logging import read_metrics
from mae_jax.models.factory import ModelSpec, encoder_of
from mae_jax.pretrain import config as pretrain_config
from mae_jax.pretrain import lib as pretrain_lib
from mae_jax.weights.load import load_model

pytestmark = one_worker(__name__)


# A 16x16 ViT (4 blocks of width 64, patch 4): big enough to learn the textures in seconds.
ENCODER = {"variant": "vit_tiny_patch16", "image_size": 16, "patch_size": 4, "embed_dim": 64,
           "depth": 4, "num_heads": 4}
PRETRAIN_STEPS = 1000
ONE = jax.devices()[:1]  # tiny models run fastest unsharded; `finetuned` covers 4 devices


@pytest.fixture(scope="module", autouse=True)
def _persistent_compilation_cache(shared_compilations):
    """Runs of one tiny model compile the same programs: the second compile is a file read."""
    yield


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    """folder: source of 4 texture classes, 1000 training and 248 validation images."""
    folder = write_labelled_dataset(str(tmp_path_factory.mktemp("textures")), num_train=1000,
                                    num_val=248, num_classes=4, size=16)
    return f"folder:{folder}"


def tiny_config(task, source, **changes):
    config = defaults(task)
    config.model.update(**ENCODER)
    config.data.update(source=source, eval_split="val", crop_scale=(0.5, 1.0), resize_ratio=1.0,
                       shuffle_buffer_size=1000)
    config.update(batch_size=96, grad_accum_steps=1, lr=6.4 if task == "linprobe" else 2e-3,
                  total_steps=6, warmup_steps=2, eval_batch_size=248, eval_every_epochs=0.0,
                  log_every_steps=2, checkpoint_every_steps=3, tensorboard=False)
    return set_fields(config, changes)


@pytest.fixture(scope="module")
def pretrained(textures, tmp_path_factory):
    """A briefly pretrained MAE on the textures' training split (norm_pix_loss: structure, not
    colour), checkpoints every 500 steps."""
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    config = tiny_pretrain_config(**{f"model.{k}": v for k, v in ENCODER.items()})
    config.model.update(decoder_embed_dim=64, decoder_num_heads=4, norm_pix_loss=True)
    config.data.source = textures  # pretraining reads the training split, without labels
    config.update(batch_size=32, lr=5e-3, total_steps=PRETRAIN_STEPS, warmup_steps=100,
                  log_every_steps=500, checkpoint_every_steps=500, keep_checkpoints=5,
                  visualize_every_steps=0)
    config.knn.update(every_steps=500, eval_split="val", num_train=1000, num_eval=248,
                      batch_size=124)  # the monitor, as train.py runs it
    pretrain_lib.train_and_evaluate(config, workdir, devices=ONE)
    return workdir, config


@pytest.mark.slow
def test_probe_of_a_briefly_pretrained_encoder_beats_a_random_one(pretrained, textures,
                                                                   tmp_path):
    probe = tiny_config("linprobe", textures, total_steps=120, warmup_steps=12,
                        init_from=pretrained[0], log_every_steps=40, checkpoint_every_steps=120)
    trained = linprobe.train_and_evaluate(probe, str(tmp_path / "pretrained"), devices=ONE)
    probe.init_from = ""
    random = linprobe.train_and_evaluate(probe, str(tmp_path / "random"), devices=ONE)
    # Measured here: 66.1 vs 37.1 after 120 probe steps (4 classes, 248 validation images).
    assert trained["top1"] > random["top1"] + 15, (trained, random)
    assert trained["num_examples"] == 248 and trained["step"] == 120
    # The encoder stayed frozen: the probe's last checkpoint holds the pretrained encoder.
    before = nnx.state(encoder_of(load_model(pretrained[0]))).to_pure_dict()
    after = nnx.state(encoder_of(load_model(str(tmp_path / "pretrained")))).to_pure_dict()
    jax.tree.map(np.testing.assert_array_equal, before, after)


def knn_top1_of(model, source):
    encoder = encoder_of(model)
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    options = pretrain_config.knn_defaults()
    options.update(eval_split="val", num_train=1000, num_eval=248, batch_size=124)
    mesh = sharding_lib.create_mesh(data=1, devices=jax.devices()[:1])
    hook = knn.make_knn_hook(options, graphdef=graphdef, mesh=mesh, logger=None,
                             source=source, image_size=16)
    return hook(0, types.SimpleNamespace(params=params, rest=rest))["knn_top1"]


@pytest.mark.slow
def test_knn_accuracy_rises_during_pretraining(pretrained, textures):
    workdir, config = pretrained
    at_init = ModelSpec.load(workdir).build(nnx.Rngs(config.seed))  # the run's step-0 weights
    start = knn_top1_of(at_init, textures)
    middle = knn_top1_of(load_model(workdir, step=PRETRAIN_STEPS // 2), textures)
    end = knn_top1_of(load_model(workdir), textures)
    # Measured here: 54.8 at init, 58.5 at step 500, 61.7 at step 1000 (on 4 devices, whose
    # sums round differently: 54.8, 66.1, 71.8). Chance: 25.
    assert start < middle < end and end > start + 5, (start, middle, end)
    # config.knn logged the same numbers during the run (metrics.jsonl eval records).
    logged = {r["step"]: r["knn_top1"] for r in read_metrics(workdir, kind="eval")
              if "knn_top1" in r}
    assert logged == pytest.approx({PRETRAIN_STEPS // 2: middle, PRETRAIN_STEPS: end}, abs=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("on_device", ["never", "always"])
def test_fine_tuning_learns_the_textures(pretrained, textures, tmp_path, on_device):
    # The full recipe (RandAugment, Mixup / CutMix, erasing, smoothing, drop path) for 30 epochs;
    # the input from tf.data ("never") or kept on the devices ("always").
    config = tiny_config("finetune", textures, total_steps=150, warmup_steps=15,
                         init_from=pretrained[0], log_every_steps=50, checkpoint_every_steps=150,
                         export_official=False, **{"data.on_device": on_device})
    result = finetune.train_and_evaluate(config, str(tmp_path), devices=ONE)
    # Measured here: 75.0 after 150 steps (81.0 after 300; chance 25); 2026-12-03: 77.0 with
    # tf.data, 76.2 on the devices (other example order and draws).
    assert result["top1"] > 65, result


@pytest.fixture(scope="module")
def finetuned(textures, tmp_path_factory):
    """A 6-step fine-tuning run with every augmentation on, exported, evaluated at the end."""
    workdir = tmp_path_factory.mktemp("finetune")
    config = tiny_config("finetune", textures, grad_accum_steps=2)
    return workdir, config, finetune.train_and_evaluate(config, str(workdir))


def test_finetune_run_leaves_results_metrics_and_official_export(finetuned):
    workdir, config, result = finetuned
    assert result["step"] == 6
    # Running a finished run again reports its evaluation again, without a second eval line;
    # one whose final evaluation failed (its checkpoint is written first) gets it logged then.
    again = finetune.train_and_evaluate(config, str(workdir))
    assert (again["step"], again["top1"]) == (6, result["top1"])
    assert len(read_metrics(str(workdir), kind="eval")) == 1
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(line for line in lines if '"eval"' not in line))
    finetune.train_and_evaluate(config, str(workdir))
    assert [r["top1"] for r in read_metrics(str(workdir), kind="eval")] == [result["top1"]]
    saved = read_results(str(workdir))
    assert saved == {k: result[k] for k in saved}
    assert set(saved) == {"top1", "top5", "loss", "num_examples", "step", "split"}
    assert saved["split"] == "val"  # which split (QA: an eval_only of another one replaced it)
    assert saved["num_examples"] == 248 and saved["top5"] == 100.0  # 4 classes: top-4
    records = read_metrics(str(workdir))
    assert [r["step"] for r in records] == [2, 4, 6]
    assert read_metrics(str(workdir), kind="eval")[-1]["top1"] == saved["top1"]
    assert os.path.exists(workdir / "export" / "mae_finetuned.pth")
    assert os.path.isdir(workdir / "export" / "classifier_flax")


def test_exported_checkpoint_evaluates_exactly_like_the_run(finetuned, tmp_path, capsys):
    workdir, config, result = finetuned
    for init_from in (workdir / "export" / "mae_finetuned.pth", workdir / "export" /
                      "classifier_flax", workdir):
        evaluation = set_fields(config.copy_and_resolve_references(),
                                {"eval_only": True, "init_from": str(init_from)})
        again = finetune.train_and_evaluate(evaluation, str(tmp_path / init_from.name))
        for key in ("top1", "top5", "num_examples"):
            assert again[key] == result[key], (init_from, key)
        assert again["loss"] == pytest.approx(result["loss"], rel=1e-5)
        # What was evaluated is recorded (QA: an eval_only workdir held no config); an
        # evaluation starts no training record.
        with open(tmp_path / init_from.name / "eval_config.json") as handle:
            assert json.load(handle)["init_from"] == str(init_from)
        assert not os.path.exists(tmp_path / init_from.name / "config.json")
    with open(workdir / "config.json") as handle:
        recorded = handle.read()
    # eval_only in the run's own directory evaluates its newest checkpoint, and says that an
    # init_from given too is not what it evaluates (QA: it was ignored without a word).
    pretrained = str(workdir / "export" / "mae_finetuned.pth")
    evaluation = set_fields(config.copy_and_resolve_references(),
                            {"eval_only": True, "init_from": pretrained})
    capsys.readouterr()
    assert finetune.train_and_evaluate(evaluation, str(workdir))["top1"] == result["top1"]
    with open(workdir / "config.json") as handle:
        assert handle.read() == recorded  # the training record is left alone
    assert (f"eval_only evaluates this workdir's checkpoint of step 6; init_from ({pretrained}) "
            "only starts a new run") in capsys.readouterr().out
    assert not list(workdir.glob("eval_results.replaced-*"))  # the same evaluation: replaced
    # Another split: the run's own evaluation is kept beside the new one, not replaced (QA:
    # an eval_only run in a training workdir replaced it, and said nothing).
    own = read_results(str(workdir))
    other = set_fields(config.copy_and_resolve_references(),
                       {"eval_only": True, "data.eval_split": "train"})
    assert finetune.train_and_evaluate(other, str(workdir))["num_examples"] == 1000
    kept = list(workdir.glob("eval_results.replaced-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == own
    assert read_results(str(workdir))["split"] == "train"
    printed = capsys.readouterr().out
    assert f"held the evaluation of step 6 (val split); kept as {kept[0]}" in printed
    os.replace(kept[0], workdir / "eval_results.json")  # the fixture's run as it was


def test_a_run_of_several_processes_starts_every_process_from_process_0s_newest_step(
        finetuned, monkeypatch):
    """init_from a run directory: each process found its own newest checkpoint, so a source
    run committing a newer one between two hosts' readings gave them different weights.
    Process 0's step is now every process's (here this process plays process 1 of 2, and
    process 0 found step 3 where this one would find 6)."""
    from jax.experimental import multihost_utils

    from mae_jax.weights.load import newest_step_everywhere

    workdir = finetuned[0]
    assert newest_step_everywhere(workdir) == 6
    assert newest_step_everywhere(workdir / "export" / "mae_finetuned.pth") is None
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda mine: np.array([3, 0]))
    assert newest_step_everywhere(workdir) == 3


def test_weights_of_another_head_count_are_refused_naming_it(finetuned):
    """From a QA pass: the head count changes no weight's shape, so a run directory recording
    4 heads loaded into a 2-head model without a word (trained, or evaluated with other
    numbers). Sources that record it (model.json) are now checked."""
    from mae_jax.classification import lib as classification_lib
    from mae_jax.classification import transfer
    from mae_jax.core.errors import WeightsError

    workdir, config, _ = finetuned
    other = config.copy_and_resolve_references()
    other.model.num_heads = 2
    spec = classification_lib.model_spec(other, 4, global_pool=True)
    with pytest.raises(WeightsError, match="has 4 attention heads, the model 2 .*"
                                           "model.num_heads=4"):
        transfer.load_classifier(str(workdir), spec=spec)
    with pytest.raises(WeightsError, match=f"Cannot start from {workdir}: The source encoder "
                                           "has 4 attention heads"):
        transfer.encoder_values(str(workdir), spec)


def test_killed_finetune_resumes_to_the_same_parameters_and_losses(finetuned, tmp_path):
    straight_dir, config, _ = finetuned
    with sigterm_after_step(3):  # a real SIGTERM after step 3, as a pre-empted job gets
        first = finetune.train_and_evaluate(config, str(tmp_path))
        assert first["step"] == 3
    assert finetune.train_and_evaluate(config, str(tmp_path))["step"] == 6
    assert losses_of(straight_dir) == pytest.approx(losses_of(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params_of(straight_dir), params_of(tmp_path))


def test_a_config_for_the_other_script_is_one_clear_error(textures, tmp_path):
    with pytest.raises(ValueError, match="finetune.py"):
        linprobe.train_and_evaluate(tiny_config("finetune", textures), str(tmp_path))


def test_probe_crops_resized_on_the_devices_train_like_host_resized_ones(textures, tmp_path):
    """linprobe.py's data.device_resize_canvas (train.py's option): the host decodes each crop
    window into a canvas, the devices resize and flip it, the labels pass through. The same
    steps as the host-resized run: the images agree to rounding (`tests/test_on_device.py`),
    so the losses agree to ~1e-3 of a loss."""
    losses = {}
    for canvas in (0, 16):
        config = tiny_config("linprobe", textures, **{
            "data.device_resize_canvas": canvas, "total_steps": 3, "log_every_steps": 1})
        result = linprobe.train_and_evaluate(config, str(tmp_path / str(canvas)), devices=ONE)
        assert result["step"] == 3
        losses[canvas] = losses_of(tmp_path / str(canvas))
    assert sorted(losses[16]) == [1, 2, 3]
    for step, loss in losses[0].items():
        assert losses[16][step] == pytest.approx(loss, rel=1e-3, abs=1e-4), step


def test_finetune_with_randaugment_on_the_devices_trains_like_the_host_run(finetuned,
                                                                           tmp_path):
    """finetune.py's data.device_resize_canvas: the host decodes each crop window and draws
    RandAugment's layers, the devices resize, flip and augment (the host run's draws; pixels
    to rounding, `tests/test_randaugment_device.py`): the same losses (to 1e-5: a level at
    some pixels; without the device's RandAugment a step's loss moves by ~1e-2)."""
    workdir, config, _ = finetuned
    config = set_fields(config.copy_and_resolve_references(), {
        "data.device_resize_canvas": 40, "export_official": False})
    assert finetune.train_and_evaluate(config, str(tmp_path))["step"] == 6
    assert losses_of(tmp_path) == pytest.approx(losses_of(workdir), rel=1e-5, abs=1e-6)


def test_finetune_on_the_devices_resumes_exactly_after_a_kill(textures, tmp_path, capsys):
    """data.on_device='always' (what 'auto' picks on GPUs for CIFAR): the training split decoded
    once onto the devices with its labels, crop + flip + RandAugment there
    (tests/test_on_device_randaugment.py pins the images). A run killed at step 3 and resumed
    ends with the straight run's parameters and losses. The linear probe runs there too."""
    config = tiny_config("finetune", textures, **{
        "data.on_device": "always", "export_official": False, "log_every_steps": 1})
    straight = finetune.train_and_evaluate(config, str(tmp_path / "straight"), devices=ONE)
    assert straight["step"] == 6
    assert "Input on device: 1000 images, 1 MB per device; crop, flip, RandAugment " \
        "rand-m9-mstd0.5-inc1 there." in capsys.readouterr().out
    with sigterm_after_step(3):  # a real SIGTERM after step 3, as a pre-empted job gets
        resumed = tmp_path / "resumed"
        assert finetune.train_and_evaluate(config, str(resumed), devices=ONE)["step"] == 3
    assert finetune.train_and_evaluate(config, str(resumed), devices=ONE)["step"] == 6
    assert losses_of(resumed) == losses_of(tmp_path / "straight")
    jax.tree.map(np.testing.assert_array_equal, params_of(tmp_path / "straight"),
                 params_of(resumed))
    # The linear probe on the devices: crop + flip (no RandAugment) and labels.
    probe = tiny_config("linprobe", textures, **{"data.on_device": "always", "total_steps": 3,
                                                 "data.device_resize_canvas": 16})
    assert linprobe.train_and_evaluate(probe, str(tmp_path / "probe"), devices=ONE)["step"] == 3
    assert "Input on device: 1000 images, 1 MB per device; crop, flip there " \
        "(data.device_resize_canvas=16 unused)." in capsys.readouterr().out
    assert sorted(losses_of(tmp_path / "probe")) == [2, 3]


@pytest.mark.parametrize("changes,message", [
    ({"data.on_device": "yes"}, "data.on_device must be one of auto, always, never"),
    ({"data.on_device": "always", "seed": -1}, "must be >= 0 for the on-device input"),
    ({"batch_size": 99, "grad_accum_steps": 3}, "must be even"),
    ({"mixup_batch": 1}, "mixup_batch 1 must be 0 .the micro-batch. or >= 2"),
    ({"data.device_resize_canvas": 8}, r"must be 0 \(resize on the host\) or an int >= "),
    ({"data.crop_scale": (0.0, 1.0)}, "crop_scale"),
    ({"layer_decay": 1.5}, "layer_decay"),
    ({"remode": "noise"}, "remode"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
])
def test_bad_finetune_configs_fail_before_any_work(textures, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        finetune.train_and_evaluate(tiny_config("finetune", textures, **changes), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_generated_source_settings_are_checked_with_the_rest_before_any_work(tmp_path):
    """QA: a split name, a class count past the 8 textures or N below it were tracebacks after
    JAX started, one at a time. Now one message lists them, before the workdir is made.
    ("validation" reads PATH/val as for any folder source.)"""
    config = tiny_config("linprobe", "generated:4", **{"data.eval_split": "test",
                                                       "data.generated_classes": 9,
                                                       "data.crop_scale": (0.5,)})
    with pytest.raises(ValueError) as error:
        linprobe.train_and_evaluate(config, str(tmp_path / "run"))
    for message in (r"data.eval_split 'test': generated data has the splits 'train' and 'val'",
                    r"data.generated_classes 9 must be in \[2, 8\]",
                    r"data.crop_scale \(0.5,\) must be \(low, high\)"):
        assert re.search(message, str(error.value)), message
    config = tiny_config("linprobe", "generated:4", **{"data.generated_classes": 5})
    with pytest.raises(ValueError, match=r"generated:4'?: N must be >= data.generated_classes 5"):
        linprobe.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_one_class_or_an_empty_validation_class_is_refused_before_training(tmp_path):
    """QA: one class trained at loss 0 and reported top-1 100; an empty class folder of the
    validation split was found at the first evaluation, after an epoch of training."""
    from PIL import Image

    from mae_jax.core.errors import BadDataError, DataNotFoundError

    for split, classes in (("train", "ab"), ("val", "a")):
        for name in classes:
            os.makedirs(tmp_path / "data" / split / name)
            for i in range(2):
                Image.new("RGB", (16, 16), (40 * i,) * 3).save(
                    tmp_path / "data" / split / name / f"{i}.png")
    os.makedirs(tmp_path / "data" / "val" / "b")  # empty
    config = tiny_config("linprobe", f"folder:{tmp_path / 'data'}", batch_size=2)
    with pytest.raises(DataNotFoundError, match=r"class folder\(s\) \['b'\] .*val.* hold no "
                       "images"):
        linprobe.train_and_evaluate(config, str(tmp_path / "two"), devices=ONE)
    assert not os.listdir(tmp_path / "two" / "checkpoints")  # no step trained
    for split in ("train", "val"):
        shutil.rmtree(tmp_path / "data" / split / "b")
    with pytest.raises(BadDataError, match=r"has 1 class\(es\) \(a\): classification needs "
                       "at least 2"):
        linprobe.train_and_evaluate(config, str(tmp_path / "one"), devices=ONE)


def test_saved_config_is_json(finetuned):
    with open(finetuned[0] / "config.json") as handle:
        assert json.load(handle)["task"] == "finetune"
