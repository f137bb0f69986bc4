r"""Offline linear probe: generated textures (8 classes, 32x32), no download, minutes on a CPU.

Probes the encoder of the pretraining demo (configs/demo.py, or any train.py run with a 32x32
vit_micro_patch4 model) with the official recipe's pieces (frozen encoder, cls token after the
final norm, BatchNorm + Linear head, LARS, warmup + cosine), sized for a laptop: batch 256 and
peak lr 6.4 (what the official batch of 16384 gets: LARS moves each weight matrix by about
lr x 0.001 of its norm per step, so a short small-batch run needs the large-batch lr), and
RandomResizedCrop scale (0.5, 1) (crops of 8% of a 32 px texture keep too little of it).

    python train.py --config=configs/demo.py --workdir=runs/demo
    python linprobe.py --config=configs/probe_demo.py --config.init_from=runs/demo
    # the random-encoder baseline:
    python linprobe.py --config=configs/probe_demo.py --workdir=runs/probe_demo_random
"""

from mae_jax.classification.config import defaults


def get_config(arg=None):
    del arg
    config = defaults("linprobe")
    config.model.variant = "vit_micro_patch4"  # width 64, 4 blocks, 4 heads, patch 4
    config.model.image_size = 32
    config.data.source = "generated:4000"  # 4000 training + 1000 validation textures
    config.data.generated_classes = 8
    config.data.generated_size = 32
    config.data.eval_split = "val"
    config.data.crop_scale = (0.5, 1.0)
    config.data.resize_ratio = 1.0  # the textures fill the image: no border to crop away
    config.data.shuffle_buffer_size = 4000
    config.batch_size = 256
    config.grad_accum_steps = 1
    config.lr = 6.4
    config.num_epochs = 40
    config.warmup_epochs = 4.0
    config.eval_batch_size = 500
    config.eval_every_epochs = 10.0
    config.log_every_steps = 25
    config.checkpoint_every_steps = 200
    return config
