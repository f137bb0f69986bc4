r"""Segmentation fine-tuning and evaluation (MAE ViT + UPerNet).

    python segment.py --config=configs/ade20k_base.py [--workdir=DIR] [--config.key=value ...]

Re-running the same command resumes from the newest checkpoint in DIR (default runs/<config>);
--config.eval_only=True evaluates without training. Add --multiprocess on multi-host jobs.
"""

from mae_jax.core.entry import run

if __name__ == "__main__":
    run("mae_jax.segmentation.lib")
