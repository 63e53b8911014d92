"""Few-shot linear probes on frozen features (the paper's Section 4, Figure 6 and Table 2).

A closed-form L2-regularised least-squares classifier: targets are {-1, +1} one-hot codes,
features are standardised with the training statistics and given a bias column, and the
weights solve (X^T X + reg * I) W = X^T Y. Accuracy is argmax agreement on a test set.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LinearProbe:
  """A fitted probe: `predict(features [n, dim]) -> labels [n]`."""
  mean: np.ndarray     # [dim]
  scale: np.ndarray    # [dim]
  weights: np.ndarray  # [dim + 1, classes], the last row is the bias.

  def logits(self, features: np.ndarray) -> np.ndarray:
    return _design(features, self.mean, self.scale) @ self.weights

  def predict(self, features: np.ndarray) -> np.ndarray:
    return np.argmax(self.logits(features), axis=-1)


def _design(features, mean, scale):
  x = (np.asarray(features, np.float64) - mean) / scale
  return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def fit_linear_probe(features, labels, num_classes: int, reg: float = 1.0) -> LinearProbe:
  """Closed-form ridge regression onto {-1, +1} one-hot targets.

  Args:
    features: [n, dim] frozen representations (e.g. the model's pre-logits).
    labels: [n] integers in [0, num_classes).
    reg: L2 strength; the bias is not regularised.
  """
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(f"Expected features [n, dim] and labels [n], got {features.shape} "
                     f"and {labels.shape}.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"Labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}.")
  mean = features.mean(axis=0)
  scale = features.std(axis=0) + 1e-6
  x = _design(features, mean, scale)
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  penalty = reg * np.eye(x.shape[1])
  penalty[-1, -1] = 0.0
  weights = np.linalg.solve(x.T @ x + penalty, x.T @ y)
  return LinearProbe(mean, scale, weights)


def sample_shots(labels, shots: int, seed: int = 0) -> np.ndarray:
  """Indices of `shots` random examples per class (sorted); ValueError if a class has fewer."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    pool = np.flatnonzero(labels == c)
    if len(pool) < shots:
      raise ValueError(f"Class {c} has only {len(pool)} examples, fewer than {shots} shots.")
    chosen.append(rng.choice(pool, shots, replace=False))
  return np.sort(np.concatenate(chosen))


def fewshot_accuracy(train_features, train_labels, test_features, test_labels, *,
                     shots: int, num_classes: int, reg: float = 1.0, seed: int = 0) -> float:
  """Top-1 accuracy of a probe fitted on `shots` examples per class of the train set."""
  index = sample_shots(train_labels, shots, seed)
  probe = fit_linear_probe(np.asarray(train_features)[index], np.asarray(train_labels)[index],
                           num_classes, reg)
  return float(np.mean(probe.predict(test_features) == np.asarray(test_labels)))
