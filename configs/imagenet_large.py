r"""Official MAE recipe, ViT-Large/16 on ImageNet-1K: 800 epochs, effective batch 4096.

As configs/imagenet_base.py with the large encoder. The paper reports 85.9 top-1 after
fine-tuning and 75.8 linear probing (ViT-L).

    python train.py --config=configs/imagenet_large.py --workdir=runs/imagenet_large \
        --config.data.data_dir=/path/to/tfds --config.grad_accum_steps=16
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imagenet_base  # noqa: E402


def get_config(arg=None):
    config = imagenet_base.get_config(arg)
    config.model.variant = "vit_large_patch16"
    return config
