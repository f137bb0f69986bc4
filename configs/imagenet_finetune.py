r"""Fine-tuning on ImageNet-1K, as the official main_finetune.py / FINETUNE.md.

Batch 1024; per model (variant=base|large|huge): base lr 5e-4 / 1e-3 / 1e-3, layer decay
0.65 / 0.75 / 0.75, drop path 0.1 / 0.2 / 0.3, 100 / 50 / 50 epochs (5 warmup). Published top-1:
83.6 / 85.9 / 86.9. Raise --config.grad_accum_steps when 1024 images do not fit at once.

    python finetune.py --config=configs/imagenet_finetune.py:variant=large \
        --config.init_from=mae_pretrain_vit_large.pth
    # Check an official fine-tuned checkpoint (expect Acc@1 83.664 for ViT-B):
    python finetune.py --config=configs/imagenet_finetune.py:variant=base \
        --config.eval_only=True --config.init_from=mae_finetuned_vit_base.pth
"""

from mae_jax.classification.config import apply_variant, defaults


def get_config(arg=None):
    config = defaults("finetune")
    # The host decodes crop windows into 512 px canvases and draws RandAugment's layers; the
    # GPUs resize, flip and augment (3.0x / 2.9x timm's transform's images/s per host core,
    # one / two cores, where RandAugment on the host gives 1.1x / 1.0x: 16 cores would not
    # feed one H200 fine-tuning ViT-B; `benchmarks/bench_finetune_input.py`). 0: all on the
    # host.
    config.data.device_resize_canvas = 512
    apply_variant(config, arg)
    return config
