"""Layer-wise learning-rate decay (BEiT / MAE fine-tuning) as an optax transformation.

With L encoder blocks and decay d, every parameter gets a depth id and the multiplier
d^(L + 1 - id) of the learning rate (BEiT's and timm's convention):

  id 0      embeddings: `embedding` (patch conv), `cls`, `Transformer/posembed_input`,
            and the ResNet stem of hybrids (`conv_root`, `gn_root`, `block{k}`)  d^(L+1)
  id i + 1  `Transformer/encoderblock_{i}` (0-based i), or row i of the scanned
            `Transformer/encoderblock`                                         d^(L-i)
  id L + 1  `Transformer/encoder_norm`, `pre_logits`, `MAPHead_0`, `head`        1

So the last block gets d, the first d^L, the embeddings d^(L+1), the head 1: "block i of
L gets lr x decay^(L - i)" with i counted from 0. A parameter outside these names is an
error rather than silently getting 1.

Scanned blocks (a leading layer axis [L, ...]) get an array [L, 1, ..., 1] that
broadcasts against the leaf, so one optax update scales each layer's slice.
`scale_by_layer_decay(multipliers)` goes after the base optimizer (it scales the final
update, i.e. lr and AdamW's decoupled weight decay together, as per-group lr does).
"""

import re

import jax
import numpy as np
import optax

from vit_jax.models import params as tree

_RESNET_STAGE = re.compile(r'^block\d+$')
_EMBEDDING_NAMES = (tree.EMBEDDING, tree.CLS, 'conv_root', 'gn_root')
_TOP_NAMES = (tree.HEAD, tree.PRE_LOGITS, 'MAPHead_0')


def check_layer_decay(decay) -> float:
  try:
    value = float(decay)
  except (TypeError, ValueError):
    value = float('nan')
  if not 0.0 < value <= 1.0:
    raise ValueError(f'config.layer_decay must be in (0, 1] (1 = no decay; about 0.65-0.75 '
                     f'for ViT-B fine-tuning), got {decay!r}.')
  return value


def _depth_id(names: list[str], num_layers: int):
  """Depth id (0 .. L + 1) of one parameter, or 'scanned' for the stacked blocks."""
  if names[0] == tree.TRANSFORMER and len(names) > 1:
    inner = names[1]
    if inner == tree.POSEMB_MODULE:
      return 0
    if inner == tree.ENCODER_NORM:
      return num_layers + 1
    if inner == tree.SCANNED_BLOCK:
      return 'scanned'
    if tree.block_index(inner) is not None:
      return tree.block_index(inner) + 1
  elif names[0] in _EMBEDDING_NAMES or _RESNET_STAGE.match(names[0]):
    return 0
  elif names[0] in _TOP_NAMES:
    return num_layers + 1
  raise ValueError(
      f"Layer decay does not know the depth of parameter {'/'.join(names)!r}: expected the "
      f'parameters of a VisionTransformer (embedding, cls, conv_root/gn_root/block*, '
      f'Transformer/{{posembed_input, encoderblock[_i], encoder_norm}}, pre_logits, '
      f'MAPHead_0, head), optionally under "params".')


def layer_decay_multipliers(params, decay: float, num_layers: int):
  """A tree like `params` of lr multipliers (see the module doc for the convention).

  params: arrays or jax.ShapeDtypeStruct, per-layer or scanned layout, optionally under
  'params'. Leaves become Python floats, or float32 arrays [L, 1, ..., 1] for the scanned
  blocks. Raises ValueError for a decay outside (0, 1] (naming config.layer_decay), or a
  num_layers that does not match the blocks in the tree.
  """
  decay = check_layer_decay(decay)
  if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
    raise ValueError(f'num_layers must be a positive integer, got {num_layers!r}.')
  num_layers = int(num_layers)
  blocks_seen = set()

  def multiplier(path, leaf):
    names = [tree.key_name(k) for k in path]
    if names and names[0] == 'params':
      names = names[1:]
    depth = _depth_id(names, num_layers) if names else None
    if depth == 'scanned':
      if leaf.shape[:1] != (num_layers,):
        raise ValueError(f"Scanned parameter {'/'.join(names)!r} has shape {leaf.shape}; "
                         f'expected a leading layer axis of num_layers={num_layers}.')
      blocks_seen.update(range(num_layers))
      exponents = num_layers - np.arange(num_layers)
      scale = (decay ** exponents).astype(np.float32)
      return scale.reshape((num_layers,) + (1,) * (len(leaf.shape) - 1))
    if depth is None:
      raise ValueError('Layer decay needs a tree of named parameters.')
    if names[0] == tree.TRANSFORMER and tree.block_index(names[1]) is not None:
      blocks_seen.add(depth - 1)
    return float(decay ** (num_layers + 1 - depth))

  multipliers = jax.tree_util.tree_map_with_path(multiplier, params)
  if blocks_seen != set(range(num_layers)):
    raise ValueError(f'The parameters hold encoder blocks {sorted(blocks_seen)}, but '
                     f'num_layers={num_layers}; pass the model\'s num_layers.')
  return multipliers


def scale_by_layer_decay(multipliers) -> optax.GradientTransformation:
  """Multiplies every update leaf by its multiplier (broadcasting); stateless.

  Chain it after the base optimizer: optax.chain(base, scale_by_layer_decay(m)).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates, multipliers)
    return scaled, state

  return optax.GradientTransformation(init_fn, update_fn)
