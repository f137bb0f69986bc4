"""The decoder ablation command, tiny: two decoder depths, each pretrained, k-NN measured,
probed and fine-tuned, and the markdown table written."""

import math
import os
import subprocess
import sys

import jax
import pytest
from conftest import ROOT, run_listing_imports, set_fields, tiny_pretrain_config

from mae_jax.classification import ablation
from mae_jax.classification.config import defaults

ENCODER = {"variant": "vit_tiny_patch16", "image_size": 16, "patch_size": 4, "embed_dim": 32,
           "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module", autouse=True)
def _persistent_compilation_cache(shared_compilations):
    """Runs of one tiny model compile the same programs: the second compile is a file read."""
    yield


def tiny(task):
    config = defaults(task)
    config.model.update(**ENCODER)
    config.data.update(source="generated:40", generated_classes=4, generated_size=16,
                       eval_split="val", shuffle_buffer_size=64)
    config.update(batch_size=8, grad_accum_steps=1, lr=1e-3, total_steps=2, warmup_steps=1,
                  eval_batch_size=8,
                  log_every_steps=1, checkpoint_every_steps=2, tensorboard=False)
    return config


@pytest.mark.slow
def test_ablation_pretrains_probes_and_fine_tunes_each_decoder_and_writes_the_table(
        tmp_path):
    pretrain = set_fields(tiny_pretrain_config(total_steps=2, warmup_steps=1),
                          {"visualize_every_steps": 0, "model.image_size": 16})
    rows = ablation.run_ablation(pretrain, tiny("linprobe"), tiny("finetune"), depths=[1, 2],
                                 widths=[32], workdir=str(tmp_path), devices=jax.devices()[:1])
    assert [(r["decoder depth"], r["decoder width"]) for r in rows] == [(1, 32), (2, 32)]
    for row in rows:
        assert all(math.isfinite(row[c]) for c in ablation.COLUMNS[2:]), row
        assert 0 <= row["k-NN top-1"] <= 100
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| decoder depth | decoder width | pretrain loss | k-NN top-1")
    assert len(table) == 4 and table[2].startswith("| 1 | 32 |")
    # Each stage has its own run directory; the pretraining read the generated images.
    for stage in ("pretrain", "linprobe", "finetune"):
        assert (tmp_path / "d2_w32" / stage / "checkpoints").is_dir()
    assert (tmp_path / "data" / "generated_classes" / "train").is_dir()


def test_the_command_line_exits_0_for_help_and_2_for_a_bad_flag():
    # absl's own parser exits 1 for both; train.py and the others say 0 and 2 (core/entry.py).
    env = {**os.environ, "MAE_JAX_MALLOC_HUGEPAGES": "0"}
    command = [sys.executable, "-m", "mae_jax.classification.ablation"]
    # The help comes before JAX, TensorFlow and the task libraries load (~0.3 s).
    helped, heavy = run_listing_imports([*command[1:], "--help"], env=env)
    assert helped.returncode == 0 and "--depths" in helped.stdout, helped.stderr[-2000:]
    assert heavy == []
    # A mistake in a config flag with a default file (loaded while the flag is defined); the
    # other mistakes go through the same parser as train.py's (tests/test_entry.py).
    wrong = subprocess.run([*command, "--config=configs/demo.py", "--probe_config.bogus=1"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    assert "Bad command line: --probe_config.bogus: the config has no field 'bogus'" \
        in wrong.stderr and "Traceback" not in wrong.stderr
    # From another directory (QA: the default probe / fine-tune configs were relative to the
    # working directory), a bad --depths is one message and status 2 (QA: a traceback, 1).
    bad = subprocess.run([*command, f"--config={ROOT}/configs/demo.py", "--depths=0"],
                         capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "ERROR: --depths [0] must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
