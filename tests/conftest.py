"""Test setup: CPU only, several simulated devices, quiet TensorFlow."""

import os

# Must be set before jax is imported anywhere: tests build meshes of 1, 2 and 4 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
