"""vit_jax: the Vision Transformer in JAX/Flax (Dosovitskiy et al., ICLR 2021)."""

__version__ = "0.1.0"
