"""The command line shared by train.py and segment.py (absl flags + ml_collections configs)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
flags.DEFINE_bool("multiprocess", False, "Initialise JAX's multi-process runtime (multi-host).")


def default_workdir(config_flag: str) -> str:
    """runs/<config name>[_<config argument>]: 'configs/cifar100_tiny.py:decoder_depth=4' ->
    'runs/cifar100_tiny_decoder_depth=4', so ablations never share a run directory."""
    path, _, argument = config_flag.partition(".py:")
    name = os.path.splitext(os.path.basename(path))[0]
    if argument:
        name += "_" + argument.replace(",", "_").replace("/", "-")
    return os.path.join("runs", name)


def run(library: str) -> None:
    """Parses flags and calls `<library>.train_and_evaluate(config, workdir)`."""
    flags.mark_flags_as_required(["config"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
        if FLAGS.multiprocess:
            # One process per host; the coordinator comes from the environment (SLURM,
            # Open MPI, TPU pods).
            import jax

            jax.distributed.initialize()
        workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
        try:
            result = importlib.import_module(library).train_and_evaluate(FLAGS.config, workdir)
        except Exception:
            # After an error, tf.data's worker threads can deadlock interpreter shutdown (their
            # destructors wait on Python): report and leave now. Checkpoints are already closed.
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        print(f"Done: {result}")

    app.run(main)
