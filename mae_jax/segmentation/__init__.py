"""Semantic segmentation (segment.py): MAE ViT + UPerNet, sliding-window evaluation, metrics."""
