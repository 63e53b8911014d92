"""The sharded train and eval steps, one `jax.jit` for every scale.

The same step runs data parallel, FSDP or tensor parallel: only the mesh from
`config.mesh` and the NamedShardings from `sharding.param_shardings` change. Images arrive
as uint8 global arrays and are scaled to [-1, 1] on the device; the model computes in its
config's dtype (e.g. bfloat16) while the parameters and optimizer state stay float32.
"""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import optim
from vit_jax import sharding as sharding_lib
from vit_jax.data.images import normalize_images

LOSSES = ("softmax_xent", "sigmoid_xent")


@flax.struct.dataclass
class TrainState:
  """Everything a train step updates. `params` is the model's 'params' collection."""
  step: jax.Array  # int32 scalar, the number of steps taken.
  params: Any
  opt_state: Any
  rng: jax.Array  # Base key; each step folds in its step number.


# ------------------------------------------------------------------------------ losses

def make_loss_fn(config, num_classes: int, *, smoothing: bool = True) -> Callable:
  """(logits [batch, classes], labels int [batch]) -> per-example loss [batch].

  config.loss: 'softmax_xent' (cross-entropy over classes) or 'sigmoid_xent' (independent
  binary cross-entropies summed over classes, as for i21k pre-training).
  config.label_smoothing: targets become (1 - s) * one_hot + s / classes.
  """
  name = config.get("loss", "softmax_xent")
  if name not in LOSSES:
    raise ValueError(f"Unknown config.loss {name!r}; choose one of {LOSSES}.")
  ls = float(config.get("label_smoothing", 0.0) or 0.0) if smoothing else 0.0
  if not 0.0 <= ls < 1.0:
    raise ValueError(f"config.label_smoothing must be in [0, 1), got {ls}.")

  def loss_fn(logits, labels):
    if logits.ndim != 2:
      raise ValueError(f"Training needs logits [batch, classes], got {logits.shape}; use "
                       "a pooled classifier ('token', 'gap' or 'map').")
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - ls) + ls / num_classes
    if name == "softmax_xent":
      return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)

  return loss_fn


# ---------------------------------------------------------------------- state creation

def _as_key(rng):
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  return rng


def input_size(config) -> int:
  """Side of the square training images: config.pp.crop if set, else the model's size."""
  pp = config.get("pp", None)
  crop = pp.get("crop", None) if pp is not None else None
  return int(crop or config.model.image_size)


def _build_state(config, model, tx, rng, params=None) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  if params is None:
    size = input_size(config)
    images = jnp.zeros((1, size, size, model.num_channels), jnp.float32)
    params = model.init({"params": params_rng}, images, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=state_rng)


def _dict_keys(path) -> tuple:
  """The trailing run of dict keys of a tree path (a param's name inside any state)."""
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(k.key)
  return tuple(reversed(keys))


def _opt_state_shardings(opt_shapes, params_shapes, params_shardings, mesh):
  """Optimizer-state leaves that mirror a parameter get its sharding; the rest replicate."""
  by_name = {}
  for path, sh in jax.tree_util.tree_leaves_with_path(params_shardings):
    by_name[_dict_keys(path)] = sh
  shapes = {_dict_keys(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params_shapes)}
  rep = sharding_lib.replicated(mesh)

  def pick(path, leaf):
    name = _dict_keys(path)
    if name in by_name and shapes[name] == leaf.shape:
      return by_name[name]
    return rep

  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def _state_shardings(config, shapes: TrainState, mesh) -> TrainState:
  params = sharding_lib.param_shardings(
      shapes.params, mesh, fsdp=bool(config.get("fsdp", False)),
      fsdp_min_size=config.get("fsdp_min_size", sharding_lib.DEFAULT_FSDP_MIN_SIZE))
  rep = sharding_lib.replicated(mesh)
  return TrainState(step=rep, params=params,
                    opt_state=_opt_state_shardings(shapes.opt_state, shapes.params, params, mesh),
                    rng=rep)


def abstract_train_state(config, model, mesh) -> TrainState:
  """The TrainState as jax.ShapeDtypeStructs carrying their NamedSharding (for restore)."""
  tx = optim.make_optimizer(config)
  shapes = jax.eval_shape(functools.partial(_build_state, config, model, tx),
                          jax.random.PRNGKey(0))
  shardings = _state_shardings(config, shapes, mesh)
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
                     "checkpoint.load_pretrained to adapt head, pos_embedding and layout):\n  "
                     + "\n  ".join(problems[:20])
                     + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _place(x, sharding: NamedSharding, dtype):
  """Host or device array -> a global jax.Array with `sharding` (works across processes)."""
  if isinstance(x, jax.Array):
    return jax.device_put(x.astype(dtype), sharding)
  x = np.asarray(x, dtype)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def create_train_state(config, model, mesh, *, rng, init_params=None):
  """A freshly initialised (or `init_params`-started) TrainState laid out on `mesh`.

  Args:
    config: reads model.image_size / pp.crop, fsdp, fsdp_min_size and the optimizer fields.
    model: the VisionTransformer (from `models.from_config(config.model, num_classes)`).
    mesh: from `sharding.make_mesh(config.mesh)`.
    rng: int seed or PRNG key; must be the same on every process.
    init_params: optional params tree (numpy or jax arrays) in the model's own layout,
      e.g. from `checkpoint.load_pretrained`.
  Returns:
    (state, state_shardings): the state and a TrainState of NamedShardings.
  """
  rng = _as_key(rng)
  tx = optim.make_optimizer(config)
  abstract = abstract_train_state(config, model, mesh)
  shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
  rep = sharding_lib.replicated(mesh)
  if init_params is None:
    build = jax.jit(functools.partial(_build_state, config, model, tx),
                    in_shardings=rep, out_shardings=shardings)
    return build(rng), shardings
  _check_params_match(init_params, abstract.params)
  params = jax.tree_util.tree_map(lambda x, a: _place(x, a.sharding, a.dtype),
                                  init_params, abstract.params)
  build = jax.jit(lambda r, p: _build_state(config, model, tx, r, p),
                  in_shardings=(rep, shardings.params), out_shardings=shardings)
  return build(rng, params), shardings


def to_host(tree):
  """jax.Arrays -> numpy arrays with the full values, on every process.

  Unlike `jax.device_get`, works for arrays split over several processes (FSDP or tensor
  parallel on multiple hosts). With several processes it is a collective: every process
  must call it, with the same tree.
  """
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


# ---------------------------------------------------------------------------- the steps

def check_batch_size(batch_size: int, mesh, accum_steps: int = 1, what="config.batch_size"):
  """ValueError unless the batch splits evenly into accum_steps x batch shards."""
  shards = sharding_lib.num_batch_shards(mesh)
  if accum_steps < 1:
    raise ValueError(f"config.accum_steps must be >= 1, got {accum_steps}.")
  if batch_size % (shards * accum_steps):
    step = shards * accum_steps
    raise ValueError(
        f"{what}={batch_size} is not divisible by accum_steps ({accum_steps}) x batch shards "
        f"({shards}: mesh {dict(mesh.shape)} over {mesh.devices.size} devices) = {step}. "
        f"Use a multiple of {step}, e.g. {max(step, batch_size // step * step)}.")


def _microbatches(x, accum: int, mesh):
  """[batch, ...] -> [accum, batch / accum, ...] without moving data between devices.

  Micro-batch k takes rows k, k + accum, k + 2 * accum, ...; since each device holds a
  contiguous block of rows whose length accum divides, it keeps its own rows.
  """
  x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
  spec = P(None, sharding_lib.batch_axes(mesh))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def classification_loss(model, loss_fn) -> Callable:
  """The classifier's `batch_loss(params, batch, rng) -> (mean loss, {})`.

  batch: {'image': uint8 [batch, h, w, c], 'label': int [batch]}; rng drives dropout.
  """
  def batch_loss(params, batch, rng):
    logits = model.apply({"params": params}, normalize_images(batch["image"]), train=True,
                         rngs={"dropout": rng})
    return jnp.mean(loss_fn(logits, batch["label"])), {}
  return batch_loss


def _loss_and_grads_fn(batch_loss, param_shardings):
  """(params, batch, rng) -> ((loss, metrics), grads laid out like the params)."""
  def loss_and_grads(params, batch, rng):
    values, grads = jax.value_and_grad(batch_loss, has_aux=True)(params, batch, rng)
    return values, jax.lax.with_sharding_constraint(grads, param_shardings)
  return loss_and_grads


def _accumulate(loss_and_grads, params, batch, rng, accum: int, mesh):
  """Mean (loss, metrics) and grads over `accum` equal micro-batches, one at a time."""
  micro = (jnp.arange(accum),
           jax.tree_util.tree_map(lambda x: _microbatches(x, accum, mesh), batch))

  def body(carry, micro):
    index, micro_batch = micro
    out = loss_and_grads(params, micro_batch, jax.random.fold_in(rng, index))
    return jax.tree_util.tree_map(jnp.add, carry, out), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda m: loss_and_grads(params, m[1], rng), first)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, zeros, micro)
  return jax.tree_util.tree_map(lambda t: t / accum, total)


def make_train_step(config, model, mesh, state_shardings, batch_loss=None):
  """A jitted `step_fn(state, batch) -> (state, metrics)`; the input state is donated.

  batch: {'image': uint8 [global_batch, h, w, 3], 'label': int32 [global_batch]} as global
  jax.Arrays (e.g. from `data.to_global`). metrics: float32 scalars 'loss' (mean over the
  batch), 'learning_rate' (used by this step), 'grad_norm' (global norm before clipping).
  With config.accum_steps > 1 the batch is processed in that many equal micro-batches
  and their gradients averaged, which equals one step on the whole batch.
  batch_loss: `(params, batch, rng) -> (loss, metrics)` for another objective (e.g.
  `mpp.mpp_batch_loss`; its metrics join the step's); default: `classification_loss`.
  """
  accum = config.get("accum_steps", 1)
  accum = 1 if accum is None else int(accum)
  check_batch_size(int(config.batch_size), mesh, accum)
  schedule, tx = optim.make_schedule(config), optim.make_optimizer(config)
  if batch_loss is None:
    batch_loss = classification_loss(model, make_loss_fn(config, model.num_classes))
  loss_and_grads = _loss_and_grads_fn(batch_loss, state_shardings.params)

  def step(state, batch):
    check_batch_size(batch["image"].shape[0], mesh, accum, what="The batch's size")
    rng = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      (loss, extra), grads = loss_and_grads(state.params, batch, rng)
    else:
      (loss, extra), grads = _accumulate(loss_and_grads, state.params, batch, rng, accum, mesh)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = {"loss": loss, **extra,
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=0)


def top_k_sums(logits, labels, losses, weights, k: int = 5) -> dict:
  """Weighted sums 'correct' (top-1), 'correct_top5' (top-k), 'loss_sum' and 'count'.

  logits [..., classes]; labels, losses and weights (0 for padding) of shape [...].
  """
  top1 = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  _, best = jax.lax.top_k(logits, min(k, logits.shape[-1]))
  topk = jnp.any(best == labels[..., None], axis=-1).astype(jnp.float32)
  return {"correct": jnp.sum(top1 * weights), "correct_top5": jnp.sum(topk * weights),
          "loss_sum": jnp.sum(losses * weights), "count": jnp.sum(weights)}


def make_eval_step(config, model, mesh, state_shardings, batch_sums=None):
  """A jitted `eval_fn(params, batch) -> sums` over the examples where batch['mask'].

  Returns float32 scalars: 'correct' (top-1), 'correct_top5', 'loss_sum' (config.loss
  without label smoothing) and 'count' (real, unpadded examples).
  batch_sums: `(params, batch, mask float [batch]) -> those sums` for another objective
  (e.g. `mpp.mpp_eval_sums`, counted per patch); default: the classifier's.
  """
  if batch_sums is None:
    loss_fn = make_loss_fn(config, model.num_classes, smoothing=False)

    def batch_sums(params, batch, mask):
      logits = model.apply({"params": params}, normalize_images(batch["image"]), train=False)
      labels = batch["label"]
      return top_k_sums(logits, labels, loss_fn(logits, labels), mask)

  def eval_fn(params, batch):
    size = batch["image"].shape[0]
    check_batch_size(size, mesh, what="The eval batch's size")
    mask = batch.get("mask", jnp.ones((size,), bool)).astype(jnp.float32)
    return batch_sums(params, batch, mask)

  return jax.jit(eval_fn,
                 in_shardings=(state_shardings.params, sharding_lib.batch_sharding(mesh)),
                 out_shardings=sharding_lib.replicated(mesh))
