r"""Official MAE pretraining recipe on ImageNet-1K: 800 epochs, effective batch 4096.

norm_pix_loss, mask 0.75, base lr 1.5e-4 (peak 2.4e-3), 40 warmup epochs, AdamW (0.9, 0.95),
wd 0.05, bfloat16 compute. The argument picks the encoder (`variant=base`, the default, `large` or
`huge`) and may add the decoder ablation (`decoder_depth=N,decoder_width=W`). The paper's
83.6 / 85.9 / 86.9 top-1 after fine-tuning and 68.0 / 75.8 linear probing (ViT-B / L / H) come
from 1600 epochs of pretraining (`--config.num_epochs=1600`); 800 give somewhat less.
Needs the ImageNet TFDS data prepared by hand (`imagenet2012`, manual download).

    python train.py --config=configs/imagenet_pretrain.py:variant=large \
        --config.data.data_dir=/path/to/tfds --config.grad_accum_steps=16
"""

from mae_jax.core.config import ConfigError, parse_arg
from mae_jax.pretrain.config import apply_arg, defaults

VARIANTS = {"base": "vit_base_patch16", "large": "vit_large_patch16", "huge": "vit_huge_patch14"}


def get_config(arg=None):
    values = parse_arg(arg)
    name = values.pop("variant", "base")
    if name not in VARIANTS:
        raise ConfigError(f"variant={name!r}: use one of {', '.join(VARIANTS)}.")
    config = defaults()
    config.model.variant = VARIANTS[name]
    config.model.norm_pix_loss = True
    config.model.dtype = "bfloat16"
    config.data.source = "tfds:imagenet2012"
    config.data.download = False
    # The host decodes crop windows into 512 px canvases, the GPUs resize them (about 2.5x the
    # host's images/s per core; ImageNet's images are mostly <= 500 px a side, so windows fit).
    config.data.device_resize_canvas = 512
    config.batch_size = 4096
    config.num_epochs = 800
    config.warmup_epochs = 40.0
    apply_arg(config, ",".join(f"{k}={v}" for k, v in values.items()))
    return config
