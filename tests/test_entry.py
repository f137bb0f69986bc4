"""The shared command line of train.py and segment.py."""

import subprocess
import sys

from mae_jax.core.entry import default_workdir


def test_config_arguments_get_their_own_default_workdir():
    assert default_workdir("configs/cifar100_tiny.py") == "runs/cifar100_tiny"
    assert (
        default_workdir("configs/cifar100_tiny.py:decoder_depth=4,decoder_width=256")
        == "runs/cifar100_tiny_decoder_depth=4_decoder_width=256"
    )


def test_train_py_requires_a_config():
    result = subprocess.run(
        [sys.executable, "train.py"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "--config" in result.stderr
