"""Converts a dataset to ArrayRecord files for the grain input pipeline.

`prepare(name, data_dir)` writes a tfds dataset ('digits' is embedded; others are
downloaded or read from manual_dir) or an image folder with file_format=array_record;
`python -m vit_jax.prepare` is the command (its help lists the accepted names).
"""

import contextlib
import importlib.util
import os

import numpy as np

from vit_jax.data import digits as digits_lib
from vit_jax.data import folder as folder_lib
from vit_jax.data import sources
from vit_jax.data.errors import UnknownDatasetError


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None,
            overwrite: bool = False) -> str:
  """Prepares `name` (tfds name or folder) in data_dir; returns its directory."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir or sources.default_data_dir())
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
  if name == 'digits':
    builder = digits_lib.digits_builder(data_dir, prepare=False)
  elif sources.is_folder_spec(name):
    if not os.path.isdir(os.path.expanduser(name)):
      raise UnknownDatasetError(f'Image folder {name!r} does not exist.')
    builder = folder_lib.ImageFolderArrayRecord(
        name, data_dir=data_dir, file_format='array_record')
    _with_progress_note(builder)
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    except tfds.core.registered.DatasetNotFoundError as e:
      raise UnknownDatasetError(
          f'Unknown tfds dataset {name!r}. See '
          'https://www.tensorflow.org/datasets/catalog/overview for names, or '
          'pass the path of an image folder.') from e
  lock = os.path.join(data_dir, f'.{builder.name}.lock')
  with digits_lib.file_lock(lock), numpy_image_encoding_without_tf():
    builder.download_and_prepare(download_config=config)
  return str(builder.data_dir)


@contextlib.contextmanager
def numpy_image_encoding_without_tf():
  """Lets tfds encode uint8 numpy images (cifar10, ...) with OpenCV, no TF.

  tfds encodes numpy arrays given to an Image feature with tf.image.encode_*.
  Without TensorFlow installed, this temporarily swaps in an OpenCV PNG/JPEG
  encoder for uint8 images (other dtypes keep the tfds path).
  """
  if importlib.util.find_spec('tensorflow') is not None:
    yield
    return
  import cv2  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.features import image_feature  # pylint: disable=g-import-not-at-top
  encoder_cls = image_feature._ImageEncoder  # pylint: disable=protected-access
  original = encoder_cls._encode_image  # pylint: disable=protected-access

  def encode(self, np_image):
    fmt = self.encoding_format
    if np_image.dtype != np.uint8 or fmt not in ('png', 'jpeg'):
      return original(self, np_image)
    image_feature._validate_np_array(np_image, shape=self.shape, dtype=self.np_dtype)  # pylint: disable=protected-access
    img = np_image
    if img.ndim == 3 and img.shape[-1] == 3:
      img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[-1] == 4:
      img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == 'jpeg' else []
    ok, buf = cv2.imencode('.png' if fmt == 'png' else '.jpg', img, params)
    if not ok:
      raise ValueError(f'OpenCV could not encode an image of shape {np_image.shape}.')
    return buf.tobytes()

  encoder_cls._encode_image = encode  # pylint: disable=protected-access
  try:
    yield
  finally:
    encoder_cls._encode_image = original  # pylint: disable=protected-access


def _with_progress_note(builder):
  n = sum(len(v) for v in builder._examples.values())  # pylint: disable=protected-access
  print(f'Converting {n} images from {builder._root} '  # pylint: disable=protected-access
        f'({len(builder.info.features["label"].names)} classes).', flush=True)
