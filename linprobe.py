r"""Linear probing of a pretrained MAE encoder (the official main_linprobe.py recipe).

    python linprobe.py --config=configs/cifar100_linprobe.py --config.init_from=runs/cifar100_tiny
        [--workdir=DIR] [--config.key=value ...]

init_from: a train.py run directory or an official mae_pretrain_vit_*.pth. Re-running the same
command resumes from the newest checkpoint in DIR (default runs/<config>); --config.eval_only=True
evaluates without training. Add --multiprocess on multi-host jobs.
"""

from mae_jax.core.entry import run

if __name__ == "__main__":
    run("mae_jax.classification.linprobe", task="linprobe")
