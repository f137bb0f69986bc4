r"""MAE pretraining.

    python train.py --config=configs/cifar100_tiny.py [--workdir=DIR] [--config.key=value ...]

Re-running the same command resumes from the newest checkpoint in DIR (default runs/<config>).
Add --multiprocess on multi-host jobs.
"""

from mae_jax.core.entry import run

if __name__ == "__main__":
    run("mae_jax.pretrain.lib")
