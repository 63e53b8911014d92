"""vit_jax: the Vision Transformer in JAX/Flax (Dosovitskiy et al., ICLR 2021).

`vit_jax.load(path, model=None, labels=None)` returns a ready predictor (see
`vit_jax.inference`); it is imported on first use, so `import vit_jax` stays cheap.
"""

__version__ = "0.1.0"


def __getattr__(name):
  if name == "load":
    from vit_jax.inference import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 'vit_jax' has no attribute {name!r}")
