"""The one error type of the checkpoints package."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or that does not fit the model."""
