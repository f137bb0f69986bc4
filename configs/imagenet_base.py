r"""Official MAE recipe, ViT-Base/16 on ImageNet-1K: 800 epochs, effective batch 4096.

norm_pix_loss, mask 0.75, base lr 1.5e-4 (peak 2.4e-3), 40 warmup epochs, AdamW (0.9, 0.95),
wd 0.05. The paper reports 83.6 top-1 after fine-tuning and 68.0 linear probing (ViT-B).
Needs the ImageNet TFDS data prepared by hand (`imagenet2012`, manual download).

    python train.py --config=configs/imagenet_base.py --workdir=runs/imagenet_base \
        --config.data.data_dir=/path/to/tfds --config.grad_accum_steps=8
"""

from mae_jax.config_defaults import apply_decoder_arg, pretrain_defaults


def get_config(arg=None):
    config = pretrain_defaults()
    config.model.variant = "vit_base_patch16"
    config.model.norm_pix_loss = True
    config.model.dtype = "bfloat16"
    config.data.source = "tfds:imagenet2012"
    config.data.download = False
    config.batch_size = 4096
    config.num_epochs = 800
    config.warmup_epochs = 40.0
    apply_decoder_arg(config, arg)
    return config
