r"""The paper's decoder ablation (Table 1a/b) as one command: for every decoder depth x width,
pretrain (train.py's library), measure k-NN, linear-probe and fine-tune the encoder, and write
a markdown table (pretrain loss, k-NN top-1, linear probe top-1, fine-tune top-1).

    python -m mae_jax.classification.ablation --config=configs/cifar100_tiny.py \
        --probe_config=configs/cifar100_linprobe.py --finetune_config=configs/cifar100_finetune.py \
        --depths=1,2,4,8 --widths=512 --workdir=runs/decoder_ablation
    # Offline and small (generated labelled shapes; minutes on a CPU):
    python -m mae_jax.classification.ablation --config=configs/demo.py \
        --probe_config=configs/probe_demo.py --finetune_config=configs/finetune_demo.py \
        --depths=1,2 --widths=64 --workdir=runs/ablation_demo

Every run has its own directory (`<workdir>/d<depth>_w<width>/{pretrain,linprobe,finetune}`), so
re-running the command resumes where it stopped and skips what is finished. When the probe config
reads generated labelled data, those images are written once and pretraining, k-NN, probe and
fine-tuning all use them (pretraining on the training split, without labels).
"""

from __future__ import annotations

import copy
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

import ml_collections

from mae_jax.pretrain import config as pretrain_config

# The libraries (JAX, TensorFlow, the tasks) are imported where they are used, after the command
# line is parsed: `--help` and a mistaken flag take ~0.3 s, as with train.py.

COLUMNS = ("decoder depth", "decoder width", "pretrain loss", "k-NN top-1", "linear probe top-1",
           "fine-tune top-1")


def encoder_knn_top1(run_dir: str, probe: ml_collections.ConfigDict, *, source: str,
                     devices=None) -> float:
    """k-NN top-1 of the encoder of a finished pretraining run, on the probe's splits."""
    import jax
    from flax import nnx

    from mae_jax.classification import knn
    from mae_jax.core import sharding as sharding_lib
    from mae_jax.weights.load import load_encoder

    encoder = load_encoder(run_dir)
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    devices = list(devices or jax.devices())
    mesh = sharding_lib.create_mesh(devices=devices)
    options = pretrain_config.knn_defaults()
    options.update(train_split=probe.data.train_split, eval_split=probe.data.eval_split,
                   batch_size=len(devices) * max(1, options.batch_size // len(devices)))
    hook = knn.make_knn_hook(options, graphdef=graphdef, mesh=mesh, logger=None, source=source,
                             image_size=encoder.image_size[0],
                             data_dir=probe.data.data_dir or None, download=probe.data.download)
    return hook(0, types.SimpleNamespace(params=params, rest=rest))["knn_top1"]


def run_one(
    pretrain: ml_collections.ConfigDict, probe: ml_collections.ConfigDict,
    tune: ml_collections.ConfigDict, *, depth: int, width: int, workdir: str, devices=None,
) -> dict[str, Any]:
    """One row of the table: pretrain, k-NN, probe and fine-tune with this decoder."""
    from mae_jax.classification import finetune, linprobe
    from mae_jax.core.run_logging import read_metrics
    from mae_jax.pretrain import lib as pretrain_lib

    pretrain = copy.deepcopy(pretrain)
    pretrain_config.apply_arg(pretrain, f"decoder_depth={depth},decoder_width={width}")
    pretrain_dir = os.path.join(workdir, "pretrain")
    pretrain_lib.train_and_evaluate(pretrain, pretrain_dir, devices=devices)
    losses = [r["loss"] for r in read_metrics(pretrain_dir) if "loss" in r]
    row: dict[str, Any] = {"decoder depth": depth, "decoder width": width,
                           "pretrain loss": losses[-1] if losses else float("nan")}
    row["k-NN top-1"] = encoder_knn_top1(pretrain_dir, probe, source=probe.data.source,
                                         devices=devices)
    for name, config, module in (("linear probe top-1", probe, linprobe),
                                 ("fine-tune top-1", tune, finetune)):
        config = copy.deepcopy(config)
        config.init_from = pretrain_dir
        if name == "fine-tune top-1":
            config.export_official = False
        result = module.train_and_evaluate(config, os.path.join(workdir, config.task),
                                           devices=devices)
        row[name] = result["top1"]
    return row


def run_ablation(
    pretrain: ml_collections.ConfigDict, probe: ml_collections.ConfigDict,
    tune: ml_collections.ConfigDict, *, depths: Sequence[int], widths: Sequence[int],
    workdir: str, devices=None,
) -> list[dict[str, Any]]:
    """Every (depth, width) pair; writes and prints `<workdir>/ablation.md`; returns the rows.
    devices: of every run (default: all)."""
    from mae_jax.classification.synthetic import TRAIN_SPLIT, resolve_labelled_source
    from mae_jax.core.config import ConfigError

    if not depths or not widths or min(depths) < 1 or min(widths) < 32:
        raise ConfigError(f"--depths {list(depths)} must be >= 1 and --widths {list(widths)} "
                          ">= 32 (heads of 32).")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    probe, tune = copy.deepcopy(probe), copy.deepcopy(tune)
    source = resolve_labelled_source(probe.data, os.path.join(workdir, "data"), seed=probe.seed)
    if source != probe.data.source:  # generated: every stage reads the same written images
        pretrain = copy.deepcopy(pretrain)
        pretrain.data.update(source=source, split=TRAIN_SPLIT)
        probe.data.source = tune.data.source = source
    rows = []
    for depth in depths:
        for width in widths:
            run_dir = os.path.join(workdir, f"d{depth}_w{width}")
            rows.append(run_one(pretrain, probe, tune, depth=depth, width=width,
                                workdir=run_dir, devices=devices))
            write_table(rows, os.path.join(workdir, "ablation.md"))
    print(markdown_table(rows))
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if c == "pretrain loss" else
                 f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows, path: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(markdown_table(rows))
    os.replace(path + ".tmp", path)


def main() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from mae_jax.core import command_line

    config_flags.DEFINE_config_file("config", None, "Pretraining config (configs/*.py).")
    # The defaults are the repository's files, wherever the command runs (QA: they were
    # relative to the working directory).
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs")
    try:  # a default file is loaded here, with its overrides from the command line
        config_flags.DEFINE_config_file(
            "probe_config", os.path.join(configs, "cifar100_linprobe.py"),
            "Linear-probe config.")
        config_flags.DEFINE_config_file(
            "finetune_config", os.path.join(configs, "cifar100_finetune.py"),
            "Fine-tuning config.")
    except Exception as error:  # noqa: BLE001 - from the command line
        command_line.bad_command_line(error, sys.argv)
    flags.DEFINE_list("depths", ["1", "2", "4", "8"], "Decoder depths.")
    flags.DEFINE_list("widths", ["512"], "Decoder widths (heads of 32 channels).")
    flags.DEFINE_string("workdir", "runs/decoder_ablation", "Directory of all runs and the table.")
    flags.mark_flags_as_required(["config"])
    values = flags.FLAGS

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        from absl import logging

        from mae_jax.core.config import ConfigError
        from mae_jax.core.errors import BadInputError

        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
        try:  # bad input: one message and status 2 (QA: a traceback and status 1)
            try:
                sizes = {name: [int(v) for v in values[name].value]
                         for name in ("depths", "widths")}
            except ValueError:
                raise ConfigError(f"--depths {values.depths} and --widths {values.widths} "
                                  "take integers, e.g. --depths=1,2,4,8") from None
            run_ablation(values.config, values.probe_config, values.finetune_config,
                         **sizes, workdir=values.workdir)
        except BadInputError as error:
            print(f"\nERROR: {error}\nExit status 2: bad input.", file=sys.stderr)
            return 2

    app.run(run, flags_parser=lambda argv: command_line.parse_flags(
        values, argv, configs=("config", "probe_config", "finetune_config")))


if __name__ == "__main__":
    main()
