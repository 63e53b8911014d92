"""Class names: a labels file (one name per line), or names made from class indices."""

from vit_jax.inference.errors import LoadError


def read_labels(path: str, num_classes: int) -> tuple:
  """The names in a labels file, one per line; LoadError unless there is one per class.

  Surrounding whitespace is stripped and trailing empty lines are ignored; an empty line
  between names is an error (it would shift every later name by one class).
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.strip() for line in f.read().splitlines()]
  except (OSError, UnicodeDecodeError) as e:
    raise LoadError(f"Cannot read the labels file {path}: {e}. Give a UTF-8 text file "
                    "with one class name per line.") from None
  while lines and not lines[-1]:
    lines.pop()
  if "" in lines:
    raise LoadError(f"Labels file {path}: line {lines.index('') + 1} is empty; give one "
                    "class name per line, in the order of the model's classes.")
  if len(lines) != num_classes:
    raise LoadError(f"Labels file {path} has {len(lines)} lines but the model's head has "
                    f"{num_classes} classes; give exactly one name per class, in class "
                    "index order.")
  return tuple(lines)


def index_names(num_classes: int) -> tuple:
  """'0', '1', ... for a model whose class names are unknown."""
  return tuple(str(i) for i in range(num_classes))
