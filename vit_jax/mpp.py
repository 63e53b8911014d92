"""Masked patch prediction training: the loss and a sharded, jitted train step.

The step is `train.make_train_step` with `mpp_batch_loss` for
`models.mpp.MaskedPatchPredictor` (the eval step `train.make_eval_step` with
`mpp_eval_sums`): the same TrainState, optimizer, schedule and NamedShardings
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


def mpp_batch_loss(model):
  """`batch_loss(params, batch, rng) -> (loss, {'accuracy': ...})` for train.make_train_step.

  rng is split into the dropout and the corruption ('mpp') streams.
  """
  def batch_loss(params, batch, rng):
    dropout_rng, mpp_rng = jax.random.split(rng)
    output = model.apply({"params": params}, normalize_images(batch["image"]), train=True,
                         rngs={"dropout": dropout_rng, "mpp": mpp_rng})
    loss, accuracy = mpp_loss(output)
    return loss, {"accuracy": accuracy}
  return batch_loss


def make_mpp_train_step(config, model, mesh, state_shardings):
  """`train.make_train_step` with the MPP loss; the input state is donated.

  batch: {'image': uint8 [global_batch, h, w, channels], ...} as global jax.Arrays.
  metrics: float32 scalars 'loss' (cross-entropy over the corrupted patches), 'accuracy'
  (top-1 on the corrupted patches), 'learning_rate' (used by this step) and 'grad_norm'.
  Each step draws its own corruption and dropout from state.rng and the step number.
  There is no gradient accumulation (config.accum_steps must be 1): micro-batches would
  draw the "random other patch" from the micro-batch, not the batch, so they would not
  equal one step on the whole batch.
  """
  accum = config.get("accum_steps", 1)
  if accum not in (None, 1):
    raise ValueError(f"The MPP step has no gradient accumulation; config.accum_steps must "
                     f"be 1, got {accum}.")
  return train.make_train_step(config, model, mesh, state_shardings,
                               batch_loss=mpp_batch_loss(model))


EVAL_SEED = 0  # Every evaluation corrupts the same patches, so evaluations compare.


def mpp_eval_sums(model):
  """`batch_sums(params, batch, mask) -> sums` for train.make_eval_step, per corrupted patch.

  The same keys as the classifier's ('correct', 'correct_top5', 'loss_sum', 'count'),
  counted over the corrupted patches of real (mask > 0) images, so the trainer's
  evaluation and best-checkpoint logic work unchanged. The corruption comes from EVAL_SEED.
  """
  def batch_sums(params, batch, mask):
    output = model.apply({"params": params}, normalize_images(batch["image"]), train=False,
                         corrupt=True, rngs={"mpp": jax.random.PRNGKey(EVAL_SEED)})
    weights = output.corrupted.astype(jnp.float32) * mask[:, None]
    xent = optax.softmax_cross_entropy_with_integer_labels(output.logits, output.targets)
    return train.top_k_sums(output.logits, output.targets, xent, weights)
  return batch_sums


def make_mpp_eval_step(config, model, mesh, state_shardings):
  """`train.make_eval_step` with `mpp_eval_sums`."""
  return train.make_eval_step(config, model, mesh, state_shardings,
                              batch_sums=mpp_eval_sums(model))
