r"""Linear probing on ImageNet-1K, as the official main_linprobe.py / FINETUNE.md.

Batch 16384 (16 accumulated micro-batches of 1024), LARS, base lr 0.1, 90 epochs (10 warmup),
weight decay 0. Published top-1 (official PT/GPU repo): ViT-B 67.8, ViT-L 76.0, ViT-H 77.2
(paper, TF/TPU: 68.0 / 75.8 / 76.6). FINETUNE.md: 50 epochs suffice for ViT-L / H
(--config.num_epochs=50).

    python linprobe.py --config=configs/imagenet_linprobe.py:variant=base \
        --config.init_from=mae_pretrain_vit_base.pth
    # ImageFolder layout instead of TFDS (IMAGENET/train/<class>/, IMAGENET/val/<class>/):
    #   --config.data.source=folder:IMAGENET --config.data.eval_split=val
    # The host only decodes, the accelerators resize + flip (2.19x the official transform's
    # images per host core, `benchmarks/bench_input.py --probe`; 7.2 GB of canvases per batch
    # of 16384; windows wider than 384 px are resized on the host):
    #   --config.data.device_resize_canvas=384
"""

from mae_jax.classification.config import apply_variant, defaults


def get_config(arg=None):
    config = defaults("linprobe")
    apply_variant(config, arg)
    return config
