"""prometar_jax: ProMetaR (CVPR 2024) prompt learning via meta-regularization in JAX/Flax."""

__version__ = "0.2.0"
