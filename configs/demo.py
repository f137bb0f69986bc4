r"""First run: a tiny MAE on generated images, no download, ~2 minutes on a laptop CPU.

Writes 2048 procedural 32x32 images into the workdir, pretrains a 4-block ViT (width 64,
patch 4) with a 2-block decoder for 600 steps, and leaves reconstruction grids in
`images/`, `loss_curve.png`, `metrics.jsonl` and TensorBoard logs in the workdir.

    python train.py --config=configs/demo.py --workdir=runs/demo
"""

from mae_jax.pretrain.config import apply_arg, defaults


def get_config(arg=None):
    config = defaults()
    config.model.variant = "vit_micro_patch4"  # width 64, 4 blocks, 4 heads, patch 4
    config.model.image_size = 32
    config.model.decoder_embed_dim = 64
    config.model.decoder_depth = 2
    config.model.decoder_num_heads = 4
    config.data.source = "generated:2048"
    config.data.generated_size = 48
    config.data.shuffle_buffer_size = 2048
    config.batch_size = 64
    config.lr = 2e-3
    config.total_steps = 600
    config.warmup_steps = 50
    config.log_every_steps = 25
    config.checkpoint_every_steps = 200
    config.visualize_every_steps = 200
    config.num_visualize_images = 8
    apply_arg(config, arg)
    return config
