"""The sharded train and eval steps, one `jax.jit` for every scale.

The same step runs data parallel, FSDP or tensor parallel: only the mesh and the
NamedShardings of the state change. What is learned comes in as `batch_loss` (and, for
evaluation, `batch_sums`) from an objective (training/objectives/); images arrive as uint8
global arrays, and the objective scales them to [-1, 1] on the device.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax.parallel.mesh import batch_axes, batch_sharding, check_batch_divisible, replicated
from vit_jax.training import ema as ema_lib


def _microbatches(x, accum: int, mesh):
  """[batch, ...] -> [accum, batch / accum, ...] without moving data between devices.

  Micro-batch k takes rows k, k + accum, k + 2 * accum, ...; since each device holds a
  contiguous block of rows whose length accum divides, it keeps its own rows.
  """
  x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
  spec = P(None, batch_axes(mesh))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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


def make_train_step(*, batch_loss: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, accum_steps: int, mesh, state_shardings,
                    ema_decay: float = 0.0):
  """A jitted `step_fn(state, batch) -> (state, metrics)`; the input state is donated.

  batch_loss: `(params, batch, rng) -> (mean loss, metrics dict)`, from an objective.
  batch: {'image': uint8 [global_batch, h, w, 3], ...} as global jax.Arrays (e.g. from
  `data.to_global`). metrics: float32 scalars 'loss', the objective's own, 'learning_rate'
  (used by this step) and 'grad_norm' (global norm before clipping).
  With accum_steps > 1 the batch is processed in that many equal micro-batches and their
  gradients averaged, which equals one step on the whole batch.
  With `state.ema_params` set, ema_decay in (0, 1) updates them from the new params:
  ema <- ema_decay * ema + (1 - ema_decay) * params (training/ema.py).
  """
  use_ema = state_shardings.ema_params is not None
  if use_ema and not 0.0 < float(ema_decay) < 1.0:
    raise ValueError(f"The state keeps an EMA, so config.ema_decay must be in (0, 1), got "
                     f"{ema_decay}.")
  loss_and_grads = _loss_and_grads_fn(batch_loss, state_shardings.params)

  def step(state, batch):
    check_batch_divisible(batch["image"].shape[0], mesh, accum_steps, "The batch's size")
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      (loss, extra), grads = loss_and_grads(state.params, batch, rng)
    else:
      (loss, extra), grads = _accumulate(loss_and_grads, state.params, batch, rng,
                                         accum_steps, mesh)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    if use_ema:
      new_state = new_state.replace(
          ema_params=ema_lib.ema_update(state.ema_params, new_state.params, ema_decay))
    metrics = {"loss": loss, **extra,
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def top_k_sums(logits, labels, losses, weights, k: int = 5) -> dict:
  """Weighted sums 'correct' (top-1), 'correct_top5' (top-k), 'loss_sum' and 'count'.

  logits [..., classes]; labels, losses and weights (0 for padding) of shape [...].
  """
  top1 = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  _, best = jax.lax.top_k(logits, min(k, logits.shape[-1]))
  topk = jnp.any(best == labels[..., None], axis=-1).astype(jnp.float32)
  return {"correct": jnp.sum(top1 * weights), "correct_top5": jnp.sum(topk * weights),
          "loss_sum": jnp.sum(losses * weights), "count": jnp.sum(weights)}


def make_eval_step(*, batch_sums: Callable, mesh, state_shardings):
  """A jitted `eval_fn(params, batch) -> sums` over the examples where batch['mask'].

  batch_sums: `(params, batch, mask float [batch]) -> sums` from an objective, e.g.
  `top_k_sums`' 'correct', 'correct_top5', 'loss_sum' and 'count' (real examples).
  """
  def eval_fn(params, batch):
    size = batch["image"].shape[0]
    check_batch_divisible(size, mesh, field="The eval batch's size")
    mask = batch.get("mask", jnp.ones((size,), bool)).astype(jnp.float32)
    return batch_sums(params, batch, mask)

  return jax.jit(eval_fn, in_shardings=(state_shardings.params, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
