"""Every linear-probe / fine-tuning config: the official values it promises, and a short real
run of each on mock TFDS data (tfds.testing.mock_data) or generated textures."""

import functools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import load_config_file, one_worker, set_fields

from mae_jax.classification import finetune, linprobe
from mae_jax.classification.config import check_config, mixup_group, resolve_resize_ratio
from mae_jax.core import run as run_lib
from mae_jax.core.checkpointing import Checkpointer

# FINETUNE.md: per-model blr, layer decay, drop path, epochs (batch 1024, 5 warmup epochs).
OFFICIAL_FINETUNE = {
    "base": ("vit_base_patch16", 5e-4, 0.65, 0.1, 100),
    "large": ("vit_large_patch16", 1e-3, 0.75, 0.2, 50),
    "huge": ("vit_huge_patch14", 1e-3, 0.75, 0.3, 50),
}


pytestmark = one_worker(__name__)


@pytest.fixture(scope="module", autouse=True)
def _persistent_compilation_cache(shared_compilations):
    """Runs of one tiny model compile the same programs: the second compile is a file read."""
    yield


@pytest.mark.parametrize("size", sorted(OFFICIAL_FINETUNE))
def test_imagenet_finetune_configs_carry_the_official_per_model_values(size):
    config = load_config_file("imagenet_finetune", f"variant={size}")
    variant, blr, decay, drop_path, epochs = OFFICIAL_FINETUNE[size]
    assert (config.model.variant, config.base_lr, config.layer_decay,
            config.model.drop_path_rate, config.num_epochs) == (variant, blr, decay, drop_path,
                                                                epochs)
    assert (config.batch_size, config.warmup_epochs, config.weight_decay, config.b2,
            config.min_lr) == (1024, 5.0, 0.05, 0.999, 1e-6)
    assert (config.label_smoothing, config.mixup, config.cutmix, config.mixup_switch_prob,
            config.reprob, config.data.randaugment) == (0.1, 0.8, 1.0, 0.5, 0.25,
                                                        "rand-m9-mstd0.5-inc1")
    assert config.mixup_batch == 32  # mixed per GPU batch of 32 (FINETUNE.md: 32 x 32 GPUs)
    # Other micro-batches: the fewest equal even runs of at most 32 images.
    assert [mixup_group(b, 32) for b in (1024, 96, 48, 100, 34, 30)] == [32, 32, 24, 20, 2, 30]
    assert mixup_group(1024, 0) == 1024
    # Runs never span devices: each device's rows, as the official mixes each GPU's batch (a
    # review: 96 images on 4 devices in runs of 32 all-gathered the batch on every device).
    assert [mixup_group(96, 32, 4), mixup_group(1024, 32, 8), mixup_group(24, 8, 4)] == [24, 32, 6]
    assert mixup_group(96, 32, 32) == 32  # 3 rows a device: runs of the micro-batch instead
    assert config.data.crop_scale == (0.08, 1.0) and config.data.crop_style == "torchvision"
    check_config(config, task="finetune", num_devices=8, num_processes=1)
    # The evaluation's resize (util/datasets.py build_transform): crop_pct 224/256 up to
    # 224 px, 1.0 above (ViT-H's 448 px fine-tune: the input size, nothing cropped away).
    for image_size, ratio, short_side in ((224, 224 / 256, 256), (448, 1.0, 448)):
        sized = load_config_file("imagenet_finetune", f"variant={size}")
        sized.model.image_size = image_size
        resolve_resize_ratio(sized)
        assert sized.data.resize_ratio == ratio
        assert int(image_size / sized.data.resize_ratio) == short_side


@pytest.mark.parametrize("size", sorted(OFFICIAL_FINETUNE))
def test_imagenet_linprobe_configs_carry_the_official_recipe(size):
    config = load_config_file("imagenet_linprobe", f"variant={size}")
    assert config.model.variant == OFFICIAL_FINETUNE[size][0]
    assert (config.batch_size, config.base_lr, config.num_epochs, config.warmup_epochs,
            config.weight_decay, config.momentum, config.trust_coefficient) == (
        16384, 0.1, 90, 10.0, 0.0, 0.9, 0.001)
    assert config.batch_size // config.grad_accum_steps == 1024  # accumulated micro-batches
    assert config.data.randaugment == "" and config.model.drop_path_rate == 0.0
    # main_linprobe.py crops with MAE's util/crop.py, not torchvision's (a QA audit).
    assert config.data.crop_style == "clipped" and config.data.crop_scale == (0.08, 1.0)
    check_config(config, task="linprobe", num_devices=8, num_processes=1)
    config.data.crop_style = "byol"
    with pytest.raises(ValueError, match="data.crop_style 'byol' must be one of torchvision, cl"):
        check_config(config, task="linprobe", num_devices=8, num_processes=1)


def test_unknown_config_arguments_are_refused():
    with pytest.raises(ValueError, match="base, large, huge"):
        load_config_file("imagenet_finetune", "variant=giant")
    with pytest.raises(ValueError, match="Unknown config argument"):
        load_config_file("imagenet_linprobe", "depth=3")


def shrink(config, **changes):
    """The config's recipe on a 2-block width-32 ViT at 16x16, for one step."""
    config.model.update(variant="vit_tiny_patch16", image_size=16, patch_size=4, embed_dim=32,
                        depth=2, num_heads=2)
    config.update(batch_size=8, grad_accum_steps=2, total_steps=1, warmup_steps=0,
                  warmup_epochs=0.0, eval_batch_size=8, log_every_steps=1,
                  checkpoint_every_steps=1, tensorboard=False, init_from="")
    config.data.update(shuffle_buffer_size=64)
    if config.task == "finetune":
        config.export_official = False
    return set_fields(config, changes)


@pytest.mark.parametrize("name,arg", [
    pytest.param("cifar100_linprobe", None, marks=pytest.mark.slow),
    pytest.param("cifar100_finetune", None, marks=pytest.mark.slow),
    pytest.param("imagenet_linprobe", "variant=base", marks=pytest.mark.slow),
    pytest.param("imagenet_finetune", "variant=large", marks=pytest.mark.slow),
    ("probe_demo", None), ("finetune_demo", None),
])
def test_every_config_runs_one_step_and_evaluates(name, arg, tmp_path, monkeypatch):
    # tfds.testing.mock_data swaps epath's file system for a fake one, process-wide, while a
    # mocked `as_dataset` runs (tfds MockFs): an orbax write finishing in the background then
    # lands there and the checkpoint is lost. Saves here are synchronous.
    monkeypatch.setattr(run_lib, "Checkpointer", functools.partial(Checkpointer, async_save=False))
    config = load_config_file(name, arg)
    library = linprobe if config.task == "linprobe" else finetune
    if config.data.source.startswith("generated:"):
        config = shrink(config, **{"data.source": "generated:40", "data.generated_size": 16})
        result = library.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
        assert result["num_examples"] == 10  # generated:40 -> 10 validation images
    else:
        config = shrink(config, total_steps=1)
        with tfds.testing.mock_data(num_examples=16):
            result = library.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
        assert result["num_examples"] == 16
    assert result["step"] == 1 and np.isfinite(result["loss"])
    assert 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.parametrize("script,config", [("linprobe.py", "configs/finetune_demo.py"),
                                           ("finetune.py", "configs/probe_demo.py")])
def test_each_script_refuses_the_other_ones_config_with_exit_status_2(script, config, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    from mae_jax.core import entry

    result = subprocess.run([sys.executable, script, f"--config={config}",
                             f"--workdir={tmp_path}"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == entry.EXIT_BAD_INPUT, result.stderr[-2000:]
    other = "finetune.py" if script == "linprobe.py" else "linprobe.py"
    assert f"python {other}" in result.stderr + result.stdout


def test_the_probes_crop_style_reaches_both_input_paths(monkeypatch):
    """The wiring of data.crop_style: the linear probe's boxes are MAE's util/crop.py ones
    (clipped) on the host (tf.data) and on the devices; fine-tuning's torchvision's."""
    from mae_jax.classification import lib
    from mae_jax.classification.config import defaults
    from mae_jax.data import images as data

    class Seen(Exception):
        pass

    def fake(*args, **options):
        raise Seen(options)

    monkeypatch.setattr(data, "create_train_iterator", fake)
    monkeypatch.setattr(lib, "OnDeviceIterator", fake)
    in_memory = (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int32))
    for task, clipped in (("linprobe", True), ("finetune", False)):
        for on_device in (None, in_memory):
            with pytest.raises(Seen) as seen:
                lib.train_batches(defaults(task), {}, None, 0, on_device)
            assert seen.value.args[0]["crop_clipped"] is clipped, (task, on_device)
