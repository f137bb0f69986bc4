r"""MAE ViT-B/16 + UPerNet on ADE20K (150 classes) at 512x512: mmsegmentation's MAE recipe.

AdamW lr 1e-4, betas (0.9, 0.999), wd 0.05, layer-wise lr decay 0.65, 1500 warmup iterations then
poly decay over 160k iterations, batch 16, drop path 0.1, layer scale 1.0, features of blocks
3/5/7/11, auxiliary FCN head (weight 0.4), sliding-window evaluation (512, stride 341).
Published with the official MAE ViT-B weights: aAcc 82.99, mIoU 48.13, mAcc 59.36.

Prepare ADE20K once (ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/):

    python segment.py --config=configs/ade20k_base.py --workdir=runs/ade20k_base \
        --config.init_from=mae_pretrain_vit_base.pth \
        --config.data.manual_dir=/data/ade_download --config.data.data_dir=/data/tfds

Evaluate a finished run again: add --config.eval_only=True.
"""

from mae_jax.segmentation.config import defaults


def get_config(arg=None):
    del arg
    config = defaults()
    config.model.variant = "vit_base_patch16"
    config.model.dtype = "bfloat16"
    config.data.source = "ade20k"
    return config
