"""Masked patch prediction training: the loss and a sharded, jitted train step.

The step is `train.make_train_step`'s counterpart for `models.mpp.MaskedPatchPredictor`:
the same TrainState, optimizer (`optim.make_optimizer`), schedule and NamedShardings
(`train.create_train_state`), so it runs unchanged on 1 device or a mesh of many. Batches
carry uint8 images only ('label' is ignored); the targets come from the images.

  model = mpp.create_model(config)
  state, shardings = train.create_train_state(config, model, mesh, rng=config.seed)
  step_fn = mpp.make_mpp_train_step(config, model, mesh, shardings)
  state, metrics = step_fn(state, batch)  # metrics: loss, accuracy, learning_rate, grad_norm

`python -m vit_jax.main --config=configs/mpp_digits.py` runs it in the trainer (any config
with an `mpp` field): evaluation then reports the accuracy of the colour prediction on
the corrupted patches (`make_mpp_eval_step`) and the exported parameters are the encoder's.
"""

import jax
import jax.numpy as jnp
import optax

from vit_jax import models
from vit_jax import optim
from vit_jax import sharding as sharding_lib
from vit_jax import train
from vit_jax.data.images import normalize_images
from vit_jax.models.mpp import MaskedPatchPredictor, MppOutput

# MaskedPatchPredictor fields read from config.mpp, with the paper's values as defaults.
MPP_FIELDS = {"rate": 0.5, "mask_frac": 0.8, "random_frac": 0.1, "bits": 3}


def create_model(config) -> MaskedPatchPredictor:
  """The MaskedPatchPredictor around config.model, with config.mpp's fields (if any)."""
  fields = dict(config.get("mpp", None) or {})
  unknown = sorted(set(fields) - set(MPP_FIELDS))
  if unknown:
    raise ValueError(f"Unknown config.mpp field(s) {unknown}; valid: {sorted(MPP_FIELDS)}.")
  return MaskedPatchPredictor(models.from_config(config.model, None),
                              **{**MPP_FIELDS, **fields})


def mpp_loss(output: MppOutput):
  """(mean cross-entropy, accuracy) over the corrupted patches, float32 scalars.

  output: the model's MppOutput (logits [batch, patches, classes], targets and corrupted
  [batch, patches]). With no corrupted patch both are 0.
  """
  weights = output.corrupted.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  xent = optax.softmax_cross_entropy_with_integer_labels(output.logits, output.targets)
  hits = (jnp.argmax(output.logits, axis=-1) == output.targets).astype(jnp.float32)
  return jnp.sum(xent * weights) / count, jnp.sum(hits * weights) / count


def _loss_and_grads_fn(model, param_shardings):
  """(params, uint8 images, rng) -> ((loss, accuracy), grads laid out like the params)."""
  def loss_and_grads(params, images, rng):
    dropout_rng, mpp_rng = jax.random.split(rng)

    def loss(p):
      output = model.apply({"params": p}, normalize_images(images), train=True,
                           rngs={"dropout": dropout_rng, "mpp": mpp_rng})
      return mpp_loss(output)

    values, grads = jax.value_and_grad(loss, has_aux=True)(params)
    return values, jax.lax.with_sharding_constraint(grads, param_shardings)
  return loss_and_grads


def make_mpp_train_step(config, model, mesh, state_shardings):
  """A jitted `step_fn(state, batch) -> (state, metrics)`; the input state is donated.

  batch: {'image': uint8 [global_batch, h, w, channels], ...} as global jax.Arrays.
  metrics: float32 scalars 'loss' (cross-entropy over the corrupted patches), 'accuracy'
  (top-1 on the corrupted patches), 'learning_rate' (used by this step) and 'grad_norm'.
  Each step draws its own corruption and dropout from state.rng and the step number.
  Gradient accumulation is not supported (config.accum_steps must be 1).
  """
  accum = config.get("accum_steps", 1)
  if accum not in (None, 1):
    raise ValueError(f"The MPP step has no gradient accumulation; config.accum_steps must "
                     f"be 1, got {accum}.")
  train.check_batch_size(int(config.batch_size), mesh)
  schedule, tx = optim.make_schedule(config), optim.make_optimizer(config)
  loss_and_grads = _loss_and_grads_fn(model, state_shardings.params)

  def step(state, batch):
    images = batch["image"]
    train.check_batch_size(images.shape[0], mesh, what="The batch's size")
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, accuracy), grads = loss_and_grads(state.params, images, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32)}
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=0)


EVAL_SEED = 0  # Every evaluation corrupts the same patches, so evaluations compare.


def make_mpp_eval_step(config, model, mesh, state_shardings):
  """A jitted `eval_fn(params, batch) -> sums` over the corrupted patches of real examples.

  The same keys as `train.make_eval_step` ('correct', 'correct_top5', 'loss_sum',
  'count'), counted per corrupted patch instead of per image, so the trainer's evaluation
  and best-checkpoint logic work unchanged. The corruption is drawn from EVAL_SEED.
  """
  del config  # Same signature as train.make_eval_step.

  def eval_fn(params, batch):
    images = batch["image"]
    train.check_batch_size(images.shape[0], mesh, what="The eval batch's size")
    real = batch.get("mask", jnp.ones(images.shape[:1], bool))
    output = model.apply({"params": params}, normalize_images(images), train=False,
                         corrupt=True, rngs={"mpp": jax.random.PRNGKey(EVAL_SEED)})
    weights = (output.corrupted & real[:, None]).astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(output.logits, output.targets)
    _, best = jax.lax.top_k(output.logits, 5)
    top1 = (best[..., 0] == output.targets).astype(jnp.float32)
    top5 = jnp.any(best == output.targets[..., None], axis=-1).astype(jnp.float32)
    return {"correct": jnp.sum(top1 * weights), "correct_top5": jnp.sum(top5 * weights),
            "loss_sum": jnp.sum(xent * weights), "count": jnp.sum(weights)}

  return jax.jit(eval_fn,
                 in_shardings=(state_shardings.params, sharding_lib.batch_sharding(mesh)),
                 out_shardings=sharding_lib.replicated(mesh))
