"""Model weights in and out: the official PyTorch layout, run directories and Flax exports."""
