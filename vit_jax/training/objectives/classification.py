"""Image classification: cross-entropy (softmax or sigmoid) on the model's logits."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vit_jax import models
from vit_jax.data.images import normalize_images
from vit_jax.training.objectives.base import Objective
from vit_jax.training.step import top_k_sums

LOSSES = ("softmax_xent", "sigmoid_xent")


def make_loss_fn(loss: str, num_classes: int, label_smoothing: float = 0.0) -> Callable:
  """(logits [batch, classes], labels int [batch]) -> per-example loss [batch].

  loss: 'softmax_xent' (cross-entropy over classes) or 'sigmoid_xent' (independent binary
  cross-entropies summed over classes, as for i21k pre-training).
  label_smoothing: targets become (1 - s) * one_hot + s / classes.
  """
  if loss not in LOSSES:
    raise ValueError(f"Unknown config.loss {loss!r}; choose one of {LOSSES}.")
  ls = float(label_smoothing or 0.0)
  if not 0.0 <= ls < 1.0:
    raise ValueError(f"config.label_smoothing must be in [0, 1), got {ls}.")

  def loss_fn(logits, labels):
    if logits.ndim != 2:
      raise ValueError(f"Training needs logits [batch, classes], got {logits.shape}; use "
                       "a pooled classifier ('token', 'gap' or 'map').")
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - ls) + ls / num_classes
    if loss == "softmax_xent":
      return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)

  return loss_fn


def classification_loss(model, loss_fn) -> Callable:
  """The classifier's `batch_loss(params, batch, rng) -> (mean loss, {})`; rng: dropout."""
  def batch_loss(params, batch, rng):
    logits = model.apply({"params": params}, normalize_images(batch["image"]), train=True,
                         rngs={"dropout": rng})
    return jnp.mean(loss_fn(logits, batch["label"])), {}
  return batch_loss


def classification_sums(model, loss_fn) -> Callable:
  """`(params, batch, mask) -> top_k_sums` of the eval-mode logits (loss unsmoothed)."""
  def batch_sums(params, batch, mask):
    logits = model.apply({"params": params}, normalize_images(batch["image"]), train=False)
    labels = batch["label"]
    return top_k_sums(logits, labels, loss_fn(logits, labels), mask)
  return batch_sums


class Classification(Objective):
  """config.model trained on the dataset's labels with config.loss."""
  name = "classification"

  def problems(self, config) -> list[str]:
    lines = []
    if config.loss not in LOSSES:
      lines.append(f"Unknown config.loss {config.loss!r}; choose one of {LOSSES}.")
    if not 0.0 <= float(config.label_smoothing or 0.0) < 1.0:
      lines.append(f"config.label_smoothing={config.label_smoothing} must be in [0, 1).")
    return lines

  def create_model(self, config, num_classes: int):
    return models.from_config(config.model, num_classes)

  def batch_loss(self, config, model) -> Callable:
    return classification_loss(
        model, make_loss_fn(config.loss, model.num_classes, config.label_smoothing))

  def eval_sums(self, config, model) -> Callable:
    return classification_sums(model, make_loss_fn(config.loss, model.num_classes))

  def describe(self, num_classes: int) -> str:
    return f"{num_classes} classes"
