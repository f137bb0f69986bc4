r"""Offline fine-tuning: generated textures (8 classes, 32x32), no download, minutes on a CPU.

Fine-tunes the encoder of the pretraining demo (configs/demo.py) with the official recipe
(global pool + fc_norm, layer decay 0.65, drop path 0.1, AdamW wd 0.05, label smoothing 0.1,
Mixup 0.8 / CutMix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, warmup + cosine),
sized for a laptop: batch 128, base lr 1e-3 (peak 5e-4), 30 epochs, crop scale (0.5, 1).

    python train.py --config=configs/demo.py --workdir=runs/demo
    python finetune.py --config=configs/finetune_demo.py --config.init_from=runs/demo
"""

from mae_jax.classification.config import defaults


def get_config(arg=None):
    del arg
    config = defaults("finetune")
    config.model.variant = "vit_micro_patch4"  # width 64, 4 blocks, 4 heads, patch 4
    config.model.image_size = 32
    config.data.source = "generated:4000"  # 4000 training + 1000 validation textures
    config.data.generated_classes = 8
    config.data.generated_size = 32
    config.data.eval_split = "val"
    config.data.crop_scale = (0.5, 1.0)
    config.data.resize_ratio = 1.0
    config.data.shuffle_buffer_size = 4000
    config.batch_size = 128
    config.base_lr = 1e-3
    config.num_epochs = 30
    config.warmup_epochs = 3.0
    config.eval_batch_size = 500
    config.eval_every_epochs = 10.0
    config.log_every_steps = 25
    config.checkpoint_every_steps = 300
    return config
