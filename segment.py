r"""Segmentation fine-tuning and evaluation (MAE ViT + UPerNet).

    python segment.py --config=configs/ade20k_base.py [--workdir=DIR] [--config.key=value ...]

Re-running the same command resumes from the newest intact checkpoint in DIR (default
runs/<config>); add --config_change_ok to resume with changed hyperparameters (recorded in
DIR/config_history.jsonl); --config.eval_only=True evaluates without training. Add
--multiprocess on multi-host jobs (see train.py).

Exit status: 0 completed, 75 pre-empted (saved; re-run to resume), 2 bad input, 3 diverged,
74 a checkpoint could not be written, 1 unexpected error (mae_jax/core/entry.py).
"""

from mae_jax.core.entry import run

if __name__ == "__main__":
    run("mae_jax.segmentation.lib", task="segment")
