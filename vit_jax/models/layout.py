"""Convert parameter trees between the per-layer and the scanned encoder layouts.

Per-layer (reference): Transformer/encoderblock_{i}/<leaf>       with the leaf's own shape.
Scanned (big_vision):  Transformer/encoderblock/<leaf>           with a leading layer axis.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp

_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def _transformer(params) -> tuple[dict, Any]:
  """Returns (the `Transformer` subtree, a function that puts a new one back)."""
  if "Transformer" in params:
    return params["Transformer"], lambda t: {**params, "Transformer": t}
  if "params" in params and "Transformer" in params["params"]:
    inner, put = _transformer(params["params"])
    return inner, lambda t: {**params, "params": put(t)}
  raise ValueError("No 'Transformer' subtree found in the parameters; expected the tree of "
                   "a VisionTransformer (optionally under 'params').")


def unrolled_to_scan(params):
  """Stacks `encoderblock_{0..L-1}` into one `encoderblock` with a leading layer axis."""
  transformer, put_back = _transformer(params)
  blocks = {int(m.group(1)): v for k, v in transformer.items() if (m := _BLOCK.match(k))}
  if not blocks:
    if "encoderblock" in transformer:
      return params  # Already scanned.
    raise ValueError("No encoder blocks found under 'Transformer'.")
  if sorted(blocks) != list(range(len(blocks))):
    raise ValueError(f"Encoder blocks are not numbered 0..{len(blocks) - 1}: {sorted(blocks)}.")
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                         *[blocks[i] for i in range(len(blocks))])
  rest = {k: v for k, v in transformer.items() if not _BLOCK.match(k)}
  return put_back({**rest, "encoderblock": stacked})


def scan_to_unrolled(params):
  """Splits the stacked `encoderblock` into `encoderblock_{i}`, one per layer."""
  transformer, put_back = _transformer(params)
  if "encoderblock" not in transformer:
    if any(_BLOCK.match(k) for k in transformer):
      return params  # Already per-layer.
    raise ValueError("No encoder blocks found under 'Transformer'.")
  stacked = transformer["encoderblock"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in transformer.items() if k != "encoderblock"}
  for i in range(num_layers):
    rest[f"encoderblock_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  return put_back(rest)
