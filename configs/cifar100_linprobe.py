r"""Linear probe of the seed's CIFAR-100 ViT-Tiny MAE (configs/cifar100_tiny.py) on CIFAR-100.

The official main_linprobe.py recipe: frozen encoder, cls token after the final norm,
BatchNorm(affine=False) + Linear head, LARS, base lr 0.1 (peak 0.1 * 4096 / 256 = 1.6), 90
epochs with 10 warmup, RandomResizedCrop(0.08, 1) (boxes as MAE's util/crop.py draws them) +
flip at 224, eval resize 256 / centre crop 224 on the test split. Batch 4096 (16384 would be 3
steps an epoch on 50,000 images).

    python train.py --config=configs/cifar100_tiny.py --workdir=runs/cifar100_tiny
    python linprobe.py --config=configs/cifar100_linprobe.py \
        --config.init_from=runs/cifar100_tiny --workdir=runs/cifar100_linprobe
"""

from mae_jax.classification.config import defaults


def get_config(arg=None):
    del arg
    config = defaults("linprobe")
    config.model.variant = "vit_tiny_patch16"
    config.data.source = "tfds:cifar100"
    config.data.eval_split = "test"
    # On GPUs (data.on_device "auto", the default) the decoded training split (153.6 MB) stays
    # on the devices, which crop, resize and flip it; the host only picks the examples. Where
    # it does not (CPU, or on_device="never"), the host decodes each 32 px crop window into a
    # 224 px canvas and the devices resize and flip (on 32 px images the resize to 224 is most
    # of the host's work: fine-tuning's input gains 7x, `benchmarks/bench_finetune_input.py
    # --cifar`). 0: all on the host.
    config.data.device_resize_canvas = 224
    config.batch_size = 4096
    config.grad_accum_steps = 4
    config.eval_batch_size = 1000
    config.log_every_steps = 10
    config.checkpoint_every_steps = 500
    return config
