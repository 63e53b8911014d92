"""The one error type of inference: a checkpoint, labels file or artifact that cannot serve."""


class LoadError(ValueError):
  """What was given cannot be turned into a predictor; the message says what to change."""
