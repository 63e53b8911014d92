"""Print a model's parameter table: `python -m vit_jax.models.summary ViT-B_16 [--num_classes N]`.

Shapes come from `jax.eval_shape`, so even ViT-H is summarised without allocating it.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from vit_jax import models


def param_shapes(model, image_size: int, num_channels: int = 3) -> dict:
  """Flat {'path/to/param': ShapeDtypeStruct} of the model's parameters."""
  images = jnp.zeros((1, image_size, image_size, num_channels), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  return flatten_dict(variables["params"], sep="/")


def count_params(model, image_size: int, num_channels: int = 3) -> int:
  return int(sum(np.prod(s.shape) for s in param_shapes(model, image_size, num_channels).values()))


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
  args = parser.parse_args(argv)
  config = models.get_config(args.model)
  model = models.from_config(config, args.num_classes)
  print(f"{args.model} ({args.num_classes} classes, {args.image_size or config.image_size} px)")
  print(format_table(param_shapes(model, args.image_size or config.image_size)))


if __name__ == "__main__":
  main()
