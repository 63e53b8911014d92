"""Image classification: cross-entropy (softmax or sigmoid) on the model's logits.

Targets are soft: one-hot with label smoothing, then (when `config.mixup_alpha` or
`config.cutmix_alpha` is set) mixed with the batch's partner examples on the device
(training/mixing.py). Both losses take soft targets: softmax cross-entropy against the
mixed distribution, and sigmoid_xent's per-class binary cross-entropies against the
mixed per-class probabilities (as big_vision's AugReg ImageNet-21k runs with Mixup).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vit_jax import models
from vit_jax.data.images import normalize_images
from vit_jax.training import mixing
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

  soft_loss = make_soft_loss_fn(loss)

  def loss_fn(logits, labels):
    return soft_loss(logits, mixing.one_hot_smoothed(labels, num_classes, ls))

  return loss_fn


def make_soft_loss_fn(loss: str) -> Callable:
  """(logits [batch, classes], soft targets [batch, classes]) -> per-example loss [batch]."""
  if loss not in LOSSES:
    raise ValueError(f"Unknown config.loss {loss!r}; choose one of {LOSSES}.")

  def soft_loss_fn(logits, targets):
    if logits.ndim != 2:
      raise ValueError(f"Training needs logits [batch, classes], got {logits.shape}; use "
                       "a pooled classifier ('token', 'gap' or 'map').")
    if loss == "softmax_xent":
      return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)

  return soft_loss_fn


def mixing_options(config) -> dict:
  """The `mixing.mix_batch` keyword arguments of a config ({} when Mixup/CutMix are off)."""
  mixup, cutmix = float(config.mixup_alpha or 0.0), float(config.cutmix_alpha or 0.0)
  if (mixup == 0 and cutmix == 0) or float(config.mix_prob) == 0:
    return {}
  return dict(mixup_alpha=mixup, cutmix_alpha=cutmix, mix_prob=float(config.mix_prob),
              switch_prob=float(config.mix_switch_prob))


def classification_loss(model, loss_fn) -> Callable:
  """The classifier's `batch_loss(params, batch, rng) -> (mean loss, {})`; rng: dropout."""
  def batch_loss(params, batch, rng):
    logits = model.apply({"params": params}, normalize_images(batch["image"]), train=True,
                         rngs={"dropout": rng})
    return jnp.mean(loss_fn(logits, batch["label"])), {}
  return batch_loss


def mixed_classification_loss(model, soft_loss_fn, num_classes: int, label_smoothing: float,
                              mix: dict) -> Callable:
  """`batch_loss` with Mixup/CutMix: smoothed one-hot targets, then the batch mixed.

  The step's rng is split into the dropout key and the mixing key. The mixing pairs
  example i with b-1-i of the batch it sees (the micro-batch under accumulation).
  """
  def batch_loss(params, batch, rng):
    dropout_rng, mix_rng = jax.random.split(rng)
    targets = mixing.one_hot_smoothed(batch["label"], num_classes, label_smoothing)
    images, targets = mixing.mix_batch(mix_rng, normalize_images(batch["image"]), targets,
                                       **mix)
    logits = model.apply({"params": params}, images, train=True,
                         rngs={"dropout": dropout_rng})
    return jnp.mean(soft_loss_fn(logits, targets)), {}
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
    for field in ("mixup_alpha", "cutmix_alpha"):
      if float(config[field] or 0.0) < 0:
        lines.append(f"config.{field}={config[field]} must be >= 0 (0 = off).")
    for field in ("mix_prob", "mix_switch_prob"):
      if not 0.0 <= float(config[field]) <= 1.0:
        lines.append(f"config.{field}={config[field]} must be in [0, 1].")
    return lines

  def create_model(self, config, num_classes: int):
    return models.from_config(config.model, num_classes)

  def batch_loss(self, config, model) -> Callable:
    mix = mixing_options(config)
    if not mix:  # Exactly the unmixed step (same rng use, same ops).
      return classification_loss(
          model, make_loss_fn(config.loss, model.num_classes, config.label_smoothing))
    return mixed_classification_loss(model, make_soft_loss_fn(config.loss), model.num_classes,
                                     float(config.label_smoothing or 0.0), mix)

  def eval_sums(self, config, model) -> Callable:
    return classification_sums(model, make_loss_fn(config.loss, model.num_classes))

  def describe(self, num_classes: int) -> str:
    return f"{num_classes} classes"
