"""gsa-jax: Gated Slot Attention in JAX, Flax NNX and Pallas."""

__version__ = "0.1.0"
