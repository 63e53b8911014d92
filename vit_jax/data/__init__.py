"""Input pipeline: tfds ArrayRecord / image folders read with grain, no TensorFlow.

The names below load their submodule on first use, so that the training step, the models
and the benchmark (which only need `images.normalize_images`) import without grain or
tensorflow-datasets, e.g. on an accelerator machine that has only JAX.
"""

import importlib

_EXPORTS = {
    "CorruptImageError": "errors",
    "DataError": "errors",
    "DatasetNotPreparedError": "errors",
    "EmptyDatasetError": "errors",
    "UnknownDatasetError": "errors",
    "decode_image": "images",
    "eval_transform": "images",
    "normalize_images": "images",
    "train_transform": "images",
    "DataIterator": "iterator",
    "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline",
    "MeshPrefetcher": "pipeline",
    "num_eval_batches": "pipeline",
    "prefetch_to_mesh": "pipeline",
    "to_global": "pipeline",
    "DatasetInfo": "sources",
    "get_info": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'vit_jax.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"vit_jax.data.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
