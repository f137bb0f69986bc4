"""PyTorch reference models (the official MAE, mmseg's UPerNet heads) for parity tests and
benchmarks. They need torch; nothing in the package imports them."""
