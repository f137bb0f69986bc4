r"""Fine-tuning the seed's CIFAR-100 ViT-Tiny MAE (configs/cifar100_tiny.py) on CIFAR-100.

The official main_finetune.py recipe with its ViT-B values: base lr 5e-4 (peak 5e-4 * 1024 /
256 = 2e-3), layer decay 0.65, drop path 0.1, 100 epochs with 5 warmup, AdamW (0.9, 0.999) wd
0.05, label smoothing 0.1, Mixup 0.8 / CutMix 1.0, RandAugment rand-m9-mstd0.5-inc1, random
erasing 0.25, at 224 (CIFAR's 32 px images upsampled); eval on the test split.

    python finetune.py --config=configs/cifar100_finetune.py \
        --config.init_from=runs/cifar100_tiny --workdir=runs/cifar100_finetune
"""

from mae_jax.classification.config import defaults


def get_config(arg=None):
    del arg
    config = defaults("finetune")
    config.model.variant = "vit_tiny_patch16"
    config.data.source = "tfds:cifar100"
    config.data.eval_split = "test"
    # On GPUs (data.on_device "auto", the default) the decoded training split (153.6 MB) stays
    # on the devices, which crop, resize, flip and RandAugment it; the host picks the examples
    # and draws RandAugment's layers (numpy, per batch). Where it does not (CPU, or
    # on_device="never"), the host decodes each 32 px crop window into a 224 px canvas and
    # draws the layers; the GPUs resize, flip and augment. Host images/s per core (`python
    # benchmarks/bench_finetune_input.py --cifar`, 2026-12-03, Intel Xeon): 4450 so, 625 all
    # on the host, timm's transform 494. 0: all on the host.
    config.data.device_resize_canvas = 224
    config.batch_size = 1024
    config.eval_batch_size = 1000
    config.log_every_steps = 10
    config.checkpoint_every_steps = 500
    return config
