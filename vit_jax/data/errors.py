"""Error types of the input pipeline.

Every error says what is wrong and how to fix it. They subclass the builtin
ValueError / FileNotFoundError so callers can catch them generically.
"""


class DataError(Exception):
  """Base class of all input pipeline errors."""


class UnknownDatasetError(DataError, ValueError):
  """`config.dataset` names neither a tfds dataset nor an existing folder."""


class DatasetNotPreparedError(DataError, FileNotFoundError):
  """A tfds dataset has not been converted to ArrayRecord in `data_dir` yet."""


class EmptyDatasetError(DataError, ValueError):
  """An image folder (or one of its class folders / splits) has no images."""


class CorruptImageError(DataError, ValueError):
  """An image could not be decoded; the message names the file or record."""

  def __init__(self, path: str, reason: str = ''):
    self.path = path
    msg = (f'Cannot decode image {path!r}' + (f' ({reason})' if reason else '')
           + '. Remove or replace the file, or set config.pp.skip_corrupt=True '
           'to skip (and count) undecodable images.')
    super().__init__(msg)

  def __reduce__(self):  # keep picklable across grain worker processes
    return (_make_corrupt, (self.args[0], self.path))


def _make_corrupt(message, path):
  err = CorruptImageError.__new__(CorruptImageError)
  Exception.__init__(err, message)
  err.path = path
  return err
