"""Converts a dataset to ArrayRecord files for the grain input pipeline.

`prepare(name, data_dir)` writes a tfds dataset ('digits' is embedded; others are
downloaded or read from manual_dir) or an image folder with file_format=array_record;
`python -m vit_jax.prepare` is the command (its help lists the accepted names).

Every image is decoded once while preparing (with the decoder training uses), so that an
undecodable file is found now rather than hours into training: all of them are reported
in one `UndecodableImagesError` naming each path. With `skip_corrupt=True` an image
folder's undecodable files are left out of the prepared copy; a tfds dataset's records
cannot be removed from tfds's files, so they are counted and training on it needs
`config.pp.skip_corrupt=True` (which skips them as before). The check runs when the data
is written (first time or `overwrite`); a tfds result is remembered in
`DECODE_CHECK_FILE` next to the prepared files, so a rerun reports it again.
"""

import contextlib
import importlib.util
import json
import os

import numpy as np

from vit_jax.data import digits as digits_lib
from vit_jax.data import folder as folder_lib
from vit_jax.data import images as images_lib
from vit_jax.data import sources
from vit_jax.data.errors import CorruptImageError
from vit_jax.data.errors import DataError
from vit_jax.data.errors import UnknownDatasetError

DECODE_CHECK_FILE = 'vit_jax_decode_check.json'
_LISTED = 200  # Paths listed in one message at most (all are counted).


class UndecodableImagesError(DataError, ValueError):
  """Images that cannot be decoded were found while preparing; `paths` lists all."""

  def __init__(self, paths, total, what, how_to_skip):
    self.paths = list(paths)
    shown = '\n  '.join(self.paths[:_LISTED])
    more = f'\n  ... and {len(self.paths) - _LISTED} more' if len(self.paths) > _LISTED else ''
    super().__init__(f'{len(self.paths)} of {total} images in {what} cannot be decoded:\n  '
                     f'{shown}{more}\nRemove or replace them, or {how_to_skip}')


def undecodable(records) -> list[str]:
  """The paths of the (path, encoded bytes) records that `decode_image` cannot decode."""
  bad = []
  for path, data in records:
    try:
      images_lib.decode_image(data, path)
    except CorruptImageError:
      bad.append(path)
  return bad


def _folder_records(items):
  for path, _ in items:
    with open(path, 'rb') as f:
      yield path, f.read()


def _check_folder(builder, skip_corrupt: bool) -> int:
  """Decodes every file of the folder; drops the bad ones if skip_corrupt (count returned)."""
  examples = builder._examples  # pylint: disable=protected-access
  total = sum(len(items) for items in examples.values())
  bad = [p for items in examples.values() for p in undecodable(_folder_records(items))]
  if bad and not skip_corrupt:
    raise UndecodableImagesError(
        bad, total, f'image folder {builder._root}',  # pylint: disable=protected-access
        'pass --skip_corrupt to leave them out of the prepared copy.')
  bad_set = set(bad)
  for split, items in examples.items():
    examples[split] = [(p, label) for p, label in items if p not in bad_set]
    if not examples[split]:
      raise UndecodableImagesError(bad, total, f'split {split!r}',
                                   'add readable images to it.')
  return len(bad)


def _check_tfds(builder, name: str, skip_corrupt: bool, fresh: bool) -> int:
  """Decodes every prepared record (or reads the remembered result); count returned."""
  marker = os.path.join(str(builder.data_dir), DECODE_CHECK_FILE)
  if not fresh and os.path.exists(marker):
    with open(marker, encoding='utf-8') as f:
      remembered = json.load(f)
    bad, total = remembered['undecodable'], remembered['total']
  elif not fresh:
    return 0  # Prepared before the check existed: not decoded again unless --overwrite.
  else:
    bad, total = [], 0
    for split in builder.info.splits:
      source = sources.TfdsSource(builder, split)
      total += len(source)
      bad += undecodable((rec['path'], rec['image'])
                         for rec in (source[i] for i in range(len(source))))
    with open(marker, 'w', encoding='utf-8') as f:
      json.dump({'undecodable': bad, 'total': total}, f)
  if bad and not skip_corrupt:
    raise UndecodableImagesError(
        bad, total, f'the prepared tfds dataset {name!r} ({builder.data_dir})',
        'rerun with --overwrite after fixing the source files, or pass --skip_corrupt to '
        'keep them and train with --config.pp.skip_corrupt=True.')
  return len(bad)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None,
            overwrite: bool = False, skip_corrupt: bool = False) -> str:
  """Prepares `name` (tfds name or folder) in data_dir; returns its directory.

  Every image is decoded once (see the module doc); undecodable ones raise
  UndecodableImagesError listing them all, unless `skip_corrupt` (then their number is
  printed).
  """
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
  is_folder = isinstance(builder, folder_lib.ImageFolderArrayRecord)
  with digits_lib.file_lock(lock), numpy_image_encoding_without_tf():
    fresh = overwrite or not builder.is_prepared()
    skipped = _check_folder(builder, skip_corrupt) if is_folder and fresh else 0
    builder.download_and_prepare(download_config=config)
    if not is_folder:
      skipped = _check_tfds(builder, name, skip_corrupt, fresh)
  if skipped:
    what = ('left out of the prepared copy' if is_folder else
            'kept in the prepared files; train with --config.pp.skip_corrupt=True')
    print(f'Skipped {skipped} undecodable image(s) ({what}).', flush=True)
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
