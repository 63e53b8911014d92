"""Masked patch prediction (ViT paper, App. B.1.2): self-supervised pre-training.

The model is `models.masked_patch_predictor.MaskedPatchPredictor` around config.model with
config.mpp's corruption (rate of patches corrupted, mask/random fractions, colour bits).
The loss is the cross-entropy of each corrupted patch's mean colour class; evaluation
counts the top-1/top-5 colour accuracy over the corrupted patches with a fixed corruption,
so the trainer's accuracy and best-checkpoint logic work unchanged. The exported
parameters are the encoder's (`vit`), which fine-tune like any ViT checkpoint. Batches
carry uint8 images only ('label' is ignored); the targets come from the images.

`python -m vit_jax.main --config=configs/mpp_digits.py` runs it.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vit_jax import models
from vit_jax.data.images import normalize_images
from vit_jax.models.masked_patch_predictor import MaskedPatchPredictor, MppOutput
from vit_jax.training.objectives.base import Objective
from vit_jax.training.step import top_k_sums

MPP_FIELDS = ("rate", "mask_frac", "random_frac", "bits")  # config.mpp's fields.
EVAL_SEED = 0  # Every evaluation corrupts the same patches, so evaluations compare.


def create_model(config) -> MaskedPatchPredictor:
  """The MaskedPatchPredictor around config.model, with config.mpp's fields."""
  fields = dict(config.mpp)
  unknown = sorted(set(fields) - set(MPP_FIELDS))
  if unknown:
    raise ValueError(f"Unknown config.mpp field(s) {unknown}; valid: {list(MPP_FIELDS)}.")
  return MaskedPatchPredictor(models.from_config(config.model, None), **fields)


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


def mpp_batch_loss(model) -> Callable:
  """`batch_loss(params, batch, rng) -> (loss, {'accuracy': ...})` for the train step.

  rng is split into the dropout and the corruption ('mpp') streams.
  """
  def batch_loss(params, batch, rng):
    dropout_rng, mpp_rng = jax.random.split(rng)
    output = model.apply({"params": params}, normalize_images(batch["image"]), train=True,
                         rngs={"dropout": dropout_rng, "mpp": mpp_rng})
    loss, accuracy = mpp_loss(output)
    return loss, {"accuracy": accuracy}
  return batch_loss


def mpp_eval_sums(model) -> Callable:
  """`batch_sums(params, batch, mask) -> sums` per corrupted patch of real (mask > 0) images.

  The same keys as the classifier's ('correct', 'correct_top5', 'loss_sum', 'count');
  the corruption comes from EVAL_SEED.
  """
  def batch_sums(params, batch, mask):
    output = model.apply({"params": params}, normalize_images(batch["image"]), train=False,
                         corrupt=True, rngs={"mpp": jax.random.PRNGKey(EVAL_SEED)})
    weights = output.corrupted.astype(jnp.float32) * mask[:, None]
    xent = optax.softmax_cross_entropy_with_integer_labels(output.logits, output.targets)
    return top_k_sums(output.logits, output.targets, xent, weights)
  return batch_sums


class MaskedPatchPrediction(Objective):
  """Pre-training from scratch; exports the encoder."""
  name = "mpp"

  def problems(self, config) -> list[str]:
    lines = []
    if config.init_from is not None:
      lines.append(f"config.init_from={config.init_from!r}: masked patch prediction "
                   "(config.objective='mpp') pre-trains from scratch; set "
                   "--config.init_from=None, or use config.objective='classification' to "
                   "fine-tune a classifier.")
    if config.accum_steps != 1:
      # Micro-batches would draw the "random other patch" from the micro-batch, not the
      # batch, so they would not equal one step on the whole batch.
      lines.append(f"config.accum_steps={config.accum_steps}: the MPP step has no gradient "
                   "accumulation; set it to 1.")
    unknown = sorted(set(config.mpp) - set(MPP_FIELDS))
    if unknown:
      lines.append(f"Unknown config.mpp field(s) {unknown}; valid: {list(MPP_FIELDS)}.")
    return lines

  def create_model(self, config, num_classes: int):
    del num_classes  # The colour classes come from config.mpp.bits.
    return create_model(config)

  def batch_loss(self, config, model) -> Callable:
    return mpp_batch_loss(model)

  def eval_sums(self, config, model) -> Callable:
    return mpp_eval_sums(model)

  def exported_params(self, params):
    return params["vit"]

  def describe(self, num_classes: int) -> str:
    return "masked patch prediction"
