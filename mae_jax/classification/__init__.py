"""Classification fine-tuning / linear-probe pieces: Mixup / CutMix, losses, LARS."""
