r"""Offline segmentation demo: a tiny ViT + UPerNet on generated scenes, a few minutes on a CPU.

Generated 48x48 scenes of 6 classes (shapes with class-specific colours and textures), the whole
ADE20K recipe at small scale (random rescale, category-ratio crop, flip, photometric distortion,
layer decay, poly schedule, auxiliary head, sliding-window evaluation). Reaches a high mIoU;
leaves eval_results.json, prediction pictures and a loss curve in the workdir.

    python segment.py --config=configs/seg_demo.py --workdir=runs/seg_demo

To start from a demo MAE: --config.init_from=runs/demo (a train.py workdir of configs/demo.py,
which has the same encoder size).
"""

from mae_jax.segmentation.config import defaults


def get_config(arg=None):
    del arg
    config = defaults()
    config.model.variant = "vit_micro_patch4"  # width 64, 4 blocks, 4 heads, patch 4
    config.model.image_size = 32
    config.model.out_indices = (0, 1, 2, 3)
    config.model.drop_path_rate = 0.05
    config.model.channels = 64
    config.model.aux_channels = 32
    config.data.source = "synthetic"
    config.data.num_classes = 6
    config.data.scene_size = 48
    config.data.num_examples = 512
    config.data.scale = (48, 48)
    config.data.eval_limit = 32
    config.batch_size = 16
    config.lr = 2e-3
    config.layer_decay = 0.9
    config.warmup_steps = 50
    config.total_steps = 500
    config.eval_every_steps = 250
    config.eval_window = 32
    config.eval_stride = 21
    config.log_every_steps = 50
    config.checkpoint_every_steps = 250
    return config
