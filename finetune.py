r"""Fine-tuning a pretrained MAE encoder for classification (the official main_finetune.py
recipe).

    python finetune.py --config=configs/cifar100_finetune.py --config.init_from=runs/cifar100_tiny
        [--workdir=DIR] [--config.key=value ...]

init_from: a train.py run directory or an official mae_pretrain_vit_*.pth; with
--config.eval_only=True also an official mae_finetuned_vit_*.pth (its published accuracy is
checked in one command). Re-running the same command resumes from the newest checkpoint in DIR
(default runs/<config>). Add --multiprocess on multi-host jobs.
"""

from mae_jax.core.entry import run

if __name__ == "__main__":
    run("mae_jax.classification.finetune", task="finetune")
