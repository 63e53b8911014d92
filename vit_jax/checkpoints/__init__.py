"""Parts of `vit_jax.checkpoint` (import that module; these are its pieces)."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or that does not fit the model."""
