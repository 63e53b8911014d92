"""`Predictor`: images of any size in, class probabilities out, one compile per batch size.

The predictor wraps a function `(params, images uint8 [batch, size, size, 3]) -> probs
[batch, classes]` (the Flax model's, or a deserialized `jax.export` artifact's) and runs it
on fixed-size batches: the last batch is padded to `batch_size`, so a whole run compiles
once. The batch is split over the local devices when `batch_size` divides by their number
(as the trainer's eval shards it), else it runs on one device.
"""

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_jax.inference import preprocess

OUTPUTS = ("softmax", "sigmoid")


def probabilities(logits, output: str):
  """logits [batch, classes] -> probabilities: softmax over classes, or per-class sigmoid.

  'sigmoid' is for models trained with `config.loss='sigmoid_xent'` (independent binary
  cross-entropies, e.g. i21k pre-training): each class gets its own probability and a row
  need not sum to 1, which is what that loss fits; a softmax would be a different model.
  """
  if output == "softmax":
    return jax.nn.softmax(logits.astype(np.float32), axis=-1)
  if output == "sigmoid":
    return jax.nn.sigmoid(logits.astype(np.float32))
  raise ValueError(f"Unknown output {output!r}; choose one of {OUTPUTS}.")


def _placed(fn: Callable, params, batch_size: int):
  """(jitted fn, params on the devices): data parallel when batch_size divides."""
  devices = jax.local_devices()
  if len(devices) > 1 and batch_size % len(devices) == 0:
    mesh = Mesh(np.array(devices), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    return jax.jit(fn, in_shardings=(replicated, batch), out_shardings=batch), params
  return jax.jit(fn), jax.device_put(params, devices[0])


@dataclasses.dataclass
class Predictor:
  """A ready classifier. `predictor(images)` -> float32 probabilities [n, classes].

  Attributes:
    image_size: the side the images are resized to (the model's resolution).
    class_names: one name per output class.
    model_name: the model's name (config.model.name or the registry name).
    output: 'softmax' (probabilities over classes) or 'sigmoid' (one per class).
    eval_mode: config.pp.eval_mode of the resize ('resize' or 'resize_crop').
    batch_size: images per compiled batch (the last batch is padded to it).
    source: what was loaded, e.g. 'workdir /runs/x (params/)'.
    notes: things the caller should know (e.g. labels fell back to class indices).
    model, params: the Flax module and its parameters; None for an export artifact.
  """
  apply_fn: Callable  # (params, uint8 [batch, size, size, 3]) -> probs [batch, classes]
  apply_params: object
  image_size: int
  class_names: tuple
  model_name: str
  output: str = "softmax"
  eval_mode: str = "resize"
  batch_size: int = 32
  source: str = ""
  notes: list = dataclasses.field(default_factory=list)
  model: Optional[object] = None
  params: Optional[dict] = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
    self.class_names = tuple(self.class_names)
    self._jitted, self._device_params = _placed(self.apply_fn, self.apply_params,
                                                self.batch_size)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def preprocess(self, images) -> np.ndarray:
    """Images (uint8 or [0, 1] float, any sizes) -> uint8 [n, size, size, 3]."""
    return preprocess.resize_batch(images, self.image_size, self.eval_mode)

  def predict_preprocessed(self, batch: np.ndarray) -> np.ndarray:
    """uint8 [n, size, size, 3] -> probabilities [n, classes], in padded fixed batches."""
    batch = np.asarray(batch)
    expected = (self.image_size, self.image_size, 3)
    if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.uint8:
      raise ValueError(f"predict_preprocessed takes uint8 [n, {self.image_size}, "
                       f"{self.image_size}, 3], got {batch.dtype} {batch.shape}; call the "
                       "predictor itself for other images.")
    out = []
    for start in range(0, len(batch), self.batch_size):
      chunk = batch[start:start + self.batch_size]
      padded = np.zeros((self.batch_size,) + expected, np.uint8)
      padded[:len(chunk)] = chunk
      probs = self._jitted(self._device_params, padded)
      out.append(np.asarray(probs)[:len(chunk)])
    if not out:
      return np.zeros((0, self.num_classes), np.float32)
    return np.concatenate(out).astype(np.float32)

  def __call__(self, images) -> np.ndarray:
    """Images -> float32 probabilities [n, classes] (see `probabilities` for 'sigmoid').

    images: a batch [n, H, W, C], one image [H, W, C], or a list of images of different
    sizes; uint8 0..255 or float 0..1; RGB, grayscale or RGBA.
    """
    return self.predict_preprocessed(self.preprocess(images))

  def top_k(self, probs: np.ndarray, k: int = 5) -> list:
    """Per row of probs: [(index, name, probability), ...] for the k most probable classes."""
    k = max(1, min(int(k), self.num_classes))
    rows = []
    for row in np.asarray(probs):
      order = np.argsort(-row, kind="stable")[:k]
      rows.append([(int(i), self.class_names[i], float(row[i])) for i in order])
    return rows
