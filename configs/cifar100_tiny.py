r"""The seed run: MAE ViT-Tiny pretraining on CIFAR-100 train at 224x224.

ViT-Tiny encoder (width 192, depth 12, 3 heads, patch 16), decoder 512/8/16, mask ratio 0.75,
base lr 1.5e-4 (peak lr = 1.5e-4 * 256 / 256), batch 256, 2000 epochs (the loss curve flattens
after ~1500), 40 warmup epochs, AdamW (0.9, 0.95), wd 0.05, raw-pixel target. The seed write-up's
"1500 / 2000 迭代次数" may mean epochs (read so here, ~390k steps) or steps; for the latter add
--config.num_epochs=0 --config.total_steps=2000 --config.warmup_steps=100.

    python train.py --config=configs/cifar100_tiny.py --workdir=runs/cifar100_tiny
    # decoder ablation (paper Table 1a/b), e.g.:
    python train.py --config=configs/cifar100_tiny.py:decoder_depth=4,decoder_width=256

Machines without internet: build the dataset elsewhere (`tfds build cifar100 --data_dir D`),
copy D here and add --config.data.data_dir=D.
"""

from mae_jax.pretrain.config import apply_arg, defaults


def get_config(arg=None):
    config = defaults()
    config.model.variant = "vit_tiny_patch16"
    config.model.image_size = 224
    config.data.source = "tfds:cifar100"
    config.batch_size = 256
    config.base_lr = 1.5e-4
    config.num_epochs = 2000
    config.warmup_epochs = 40.0
    config.checkpoint_every_steps = 2000
    config.visualize_every_steps = 2000
    # k-NN top-1 of the encoder (4096 train images as the bank, 1024 test queries) every 5000 steps.
    config.knn.every_steps = 5000
    config.knn.eval_split = "test"
    apply_arg(config, arg)
    return config
