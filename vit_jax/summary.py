"""Print a model's parameter table: `python -m vit_jax.summary ViT-B_16 [--num_classes N]`.

Shapes come from `jax.eval_shape`, so even ViT-H is summarised without allocating it.
"""

import argparse
import sys

import numpy as np

from vit_jax import models
from vit_jax.cli import errors as cli_errors


def format_table(shapes: dict) -> str:
  width = max(len(k) for k in shapes)
  lines = [f"{'parameter':<{width}}  {'shape':<22} {'count':>12}"]
  for name, s in shapes.items():
    lines.append(f"{name:<{width}}  {str(tuple(s.shape)):<22} {int(np.prod(s.shape)):>12,}")
  total = sum(int(np.prod(s.shape)) for s in shapes.values())
  lines.append(f"{'total':<{width}}  {'':<22} {total:>12,}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("model", nargs="?", default="ViT-B_16", help=", ".join(models.MODEL_NAMES))
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--verbosity", type=int, default=0,
                      help="1: print the traceback of an error too")
  args = parser.parse_args(argv)
  try:
    config = models.get_config(args.model)
    model = models.from_config(config, args.num_classes)
    table = format_table(models.param_shapes(model, args.image_size or config.image_size))
  except cli_errors.INPUT_ERRORS as e:  # An unknown name, a size the patches do not fit.
    cli_errors.report(e, argv)
    return 2
  print(f"{args.model} ({args.num_classes} classes, {args.image_size or config.image_size} px)")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
