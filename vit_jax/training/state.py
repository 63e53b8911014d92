"""The train state and its layout on a device mesh.

The parameters and optimizer state are float32 `jax.Array`s with the NamedShardings of
`parallel.shardings` (replicated, FSDP or tensor parallel); the step and RNG replicate.
With EMA on (`config.ema_decay` > 0) the state is an `EmaTrainState`, whose extra field
`ema_params` is a float32 copy of the params' tree laid out exactly like the params. With
it off the state is the plain `TrainState` (its `ema_params` reads None but is no field),
so its tree, and the checkpoints written before EMA existed, are unchanged.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.checkpoints import place_like
from vit_jax.parallel import shardings as shardings_lib
from vit_jax.parallel.mesh import replicated
from vit_jax.training import ema as ema_lib


@flax.struct.dataclass
class TrainState:
  """Everything a train step updates. `params` is the model's 'params' collection."""
  step: jax.Array  # int32 scalar, the number of steps taken.
  params: Any
  opt_state: Any
  rng: jax.Array  # Base key; each step folds in its step number.
  ema_params = None  # Not a field: EMA is off (see EmaTrainState).


@flax.struct.dataclass
class EmaTrainState(TrainState):
  """A TrainState that also keeps the EMA of its params (float32, sharded like them)."""
  ema_params: Any = None


def _make_state(ema_params=None, **fields) -> TrainState:
  if ema_params is None:
    return TrainState(**fields)
  return EmaTrainState(ema_params=ema_params, **fields)


def input_size(config) -> int:
  """Side of the square training images: config.pp.crop if set, else the model's size."""
  return int(config.pp.crop or config.model.image_size)


def layout_options(config) -> dict:
  """The keyword arguments of `create_train_state` / `abstract_train_state` a config sets."""
  return dict(image_size=input_size(config), fsdp=bool(config.fsdp),
              fsdp_min_size=int(config.fsdp_min_size), ema=float(config.ema_decay) > 0)


def _as_key(rng):
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  return rng


def _build_state(model, tx, image_size, ema, rng, params=None) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  if params is None:
    images = jnp.zeros((1, image_size, image_size, model.num_channels), jnp.float32)
    params = model.init({"params": params_rng}, images, train=False)["params"]
  return _make_state(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params), rng=state_rng,
                     ema_params=ema_lib.init_ema(params) if ema else None)


def _state_shardings(shapes: TrainState, mesh, fsdp: bool, fsdp_min_size: int) -> TrainState:
  params = shardings_lib.param_shardings(shapes.params, mesh, fsdp=fsdp,
                                         fsdp_min_size=fsdp_min_size)
  rep = replicated(mesh)
  opt_state = shardings_lib.opt_state_shardings(shapes.opt_state, shapes.params, params, mesh)
  return _make_state(step=rep, params=params, opt_state=opt_state, rng=rep,
                     ema_params=None if shapes.ema_params is None else params)


def abstract_train_state(model, tx, mesh, *, image_size: int, fsdp: bool = False,
                         fsdp_min_size: int = shardings_lib.DEFAULT_FSDP_MIN_SIZE,
                         ema: bool = False):
  """The TrainState as jax.ShapeDtypeStructs carrying their NamedSharding (for restore)."""
  shapes = jax.eval_shape(functools.partial(_build_state, model, tx, image_size, ema),
                          jax.random.PRNGKey(0))
  shardings = _state_shardings(shapes, mesh, fsdp, fsdp_min_size)
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _check_params_match(params, abstract_params):
  """ValueError naming every missing, unexpected or mis-shaped parameter."""
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  problems = [f"missing {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(flat))]
  problems += [f"unexpected {k}" for k in sorted(set(flat) - set(want))]
  problems += [f"{k}: got {tuple(np.shape(flat[k]))}, model wants {tuple(want[k].shape)}"
               for k in sorted(set(flat) & set(want))
               if tuple(np.shape(flat[k])) != tuple(want[k].shape)]
  if problems:
    raise ValueError("init_params do not fit the model (load them with "
                     "checkpoints.load_pretrained to adapt head, pos_embedding and layout):\n  "
                     + "\n  ".join(problems[:20])
                     + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def create_train_state(model, tx, mesh, *, rng, image_size: int, fsdp: bool = False,
                       fsdp_min_size: int = shardings_lib.DEFAULT_FSDP_MIN_SIZE,
                       init_params=None, ema: bool = False):
  """A freshly initialised (or `init_params`-started) TrainState laid out on `mesh`.

  Args:
    model: the VisionTransformer (or an objective's model around it).
    tx: the optax optimizer (`optim.make_optimizer(config)`).
    mesh: from `parallel.mesh.make_mesh(config.mesh)`.
    rng: int seed or PRNG key; must be the same on every process.
    image_size: side of the square images the parameters are initialised for.
    fsdp, fsdp_min_size: see `parallel.shardings.param_shardings`.
    init_params: optional params tree (numpy or jax arrays) in the model's own layout,
      e.g. from `checkpoints.load_pretrained`.
    ema: keep an EMA of the params (`ema_params`, starting equal to the params).
  Returns:
    (state, state_shardings): the state and a TrainState of NamedShardings.
  """
  rng = _as_key(rng)
  abstract = abstract_train_state(model, tx, mesh, image_size=image_size, fsdp=fsdp,
                                  fsdp_min_size=fsdp_min_size, ema=ema)
  shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
  rep = replicated(mesh)
  build = functools.partial(_build_state, model, tx, image_size, ema)
  if init_params is None:
    return jax.jit(build, in_shardings=rep, out_shardings=shardings)(rng), shardings
  _check_params_match(init_params, abstract.params)
  params = jax.tree_util.tree_map(place_like, init_params, abstract.params)
  build = jax.jit(build, in_shardings=(rep, shardings.params), out_shardings=shardings)
  return build(rng, params), shardings
