"""mae-jax: Masked Autoencoders in JAX/Flax NNX."""
