"""The ViT parameter tree: the layer names every other module refers to, and tree helpers.

Per-layer (reference) layout:  Transformer/encoderblock_{i}/<leaf>   with the leaf's own shape.
Scanned (big_vision) layout:   Transformer/encoderblock/<leaf>       with a leading layer axis.

The model (encoder.py, vit.py) names its layers with these constants, and sharding rules,
checkpoint loaders and the timm/HF mappings build their paths from them, so a renamed layer
fails `tests/test_models.py::test_parameter_names_match_the_model` instead of silently
breaking a mapping.
"""

import re
from typing import Any, Callable

import jax
import numpy as np

# Top level.
EMBEDDING = "embedding"
CLS = "cls"
TRANSFORMER = "Transformer"
PRE_LOGITS = "pre_logits"
HEAD = "head"
# Under Transformer.
POSEMB_MODULE = "posembed_input"
ENCODER_NORM = "encoder_norm"
SCANNED_BLOCK = "encoderblock"
POSEMB = f"{TRANSFORMER}/{POSEMB_MODULE}/pos_embedding"
# Inside an encoder block.
ATTENTION_NORM = "LayerNorm_0"
ATTENTION = "MultiHeadDotProductAttention_0"
MLP_NORM = "LayerNorm_1"
MLP = "MlpBlock_0"
MLP_DENSE = ("Dense_0", "Dense_1")  # Inside MlpBlock_0: dim -> mlp_dim -> dim.
MLP_IN = f"{MLP}/{MLP_DENSE[0]}"
MLP_OUT = f"{MLP}/{MLP_DENSE[1]}"
QKV = ("query", "key", "value")  # Kernels [dim, heads, head_dim], biases [heads, head_dim].
ATTENTION_OUT = "out"  # Kernel [heads, head_dim, dim].

# The released .npz files number the layers of a block globally (pre-Linen Flax).
OLD_BLOCK_NAMES = {
    "LayerNorm_0": ATTENTION_NORM,
    "MultiHeadDotProductAttention_1": ATTENTION,
    "LayerNorm_2": MLP_NORM,
    "MlpBlock_3": MLP,
}

_BLOCK = re.compile(rf"^{SCANNED_BLOCK}_(\d+)$")


def block_name(index: int) -> str:
  """'encoderblock_3' for index 3 (per-layer layout)."""
  return f"{SCANNED_BLOCK}_{index}"


def block_index(name: str):
  """3 for 'encoderblock_3'; None for any other name."""
  match = _BLOCK.match(name)
  return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- paths


def key_name(key) -> str:
  """One entry of a jax key path as a string (dict key, attribute or index)."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_str(path) -> str:
  """A jax key path -> 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'."""
  return "/".join(key_name(k) for k in path)


def dict_path(path) -> tuple:
  """The trailing run of dict keys of a key path: a parameter's name inside any state
  (e.g. inside an optimizer state that wraps the params tree)."""
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(k.key)
  return tuple(reversed(keys))


def _is_leaf(value) -> bool:
  """An array (or any value) rather than a mapping of sub-trees."""
  return not (isinstance(value, dict) or hasattr(value, "items") and not hasattr(value, "shape"))


def flatten(tree, sep: str = "/") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    if _is_leaf(value):
      flat[str(key)] = value
    else:
      for sub, leaf in flatten(value, sep).items():
        flat[f"{key}{sep}{sub}"] = leaf
  return flat


def unflatten(flat: dict[str, Any], sep: str = "/") -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(sep)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def count_params(params) -> int:
  """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# --------------------------------------------------------------------------- layouts


def _transformer(params) -> tuple[dict, Callable]:
  """Returns (the `Transformer` subtree, a function that puts a new one back)."""
  if TRANSFORMER in params:
    return params[TRANSFORMER], lambda t: {**params, TRANSFORMER: t}
  if "params" in params and TRANSFORMER in params["params"]:
    inner, put = _transformer(params["params"])
    return inner, lambda t: {**params, "params": put(t)}
  raise ValueError(f"No '{TRANSFORMER}' subtree found in the parameters; expected the tree "
                   "of a VisionTransformer (optionally under 'params').")


def is_scanned(params) -> bool:
  """True for the scanned layout (one stacked `encoderblock`)."""
  return SCANNED_BLOCK in _transformer(params)[0]


def _index_leaf(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def unrolled_to_scan(params, stack: Callable = None):
  """Stacks `encoderblock_{0..L-1}` into one `encoderblock` with a leading layer axis.

  stack: how leaves are stacked (default jnp.stack; np.stack keeps them on the host).
  """
  if stack is None:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    stack = jnp.stack
  transformer, put_back = _transformer(params)
  blocks = {block_index(k): v for k, v in transformer.items() if block_index(k) is not None}
  if not blocks:
    if SCANNED_BLOCK in transformer:
      return params  # Already scanned.
    raise ValueError(f"No encoder blocks found under '{TRANSFORMER}'.")
  if sorted(blocks) != list(range(len(blocks))):
    raise ValueError(f"Encoder blocks are not numbered 0..{len(blocks) - 1}: {sorted(blocks)}.")
  stacked = jax.tree.map(lambda *leaves: stack(leaves), *[blocks[i] for i in range(len(blocks))])
  rest = {k: v for k, v in transformer.items() if block_index(k) is None}
  return put_back({**rest, SCANNED_BLOCK: stacked})


def scan_to_unrolled(params):
  """Splits the stacked `encoderblock` into `encoderblock_{i}`, one per layer.

  Leaves may be arrays or jax.ShapeDtypeStructs (then each layer gets the trailing shape).
  """
  transformer, put_back = _transformer(params)
  if SCANNED_BLOCK not in transformer:
    if any(block_index(k) is not None for k in transformer):
      return params  # Already per-layer.
    raise ValueError(f"No encoder blocks found under '{TRANSFORMER}'.")
  stacked = transformer[SCANNED_BLOCK]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in transformer.items() if k != SCANNED_BLOCK}
  for i in range(num_layers):
    rest[block_name(i)] = jax.tree.map(lambda leaf, i=i: _index_leaf(leaf, i), stacked)
  return put_back(rest)
