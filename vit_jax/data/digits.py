"""The embedded default dataset: scikit-learn's handwritten digits as tfds.

1797 8x8 grayscale scans (values 0..16) shipped with scikit-learn, so no
download is needed. Stored as PNG (scaled to 0..255) in ArrayRecord files, so
training reads it through exactly the same path as any real tfds dataset.
Splits: a fixed stratified 80/20 split, `train` (1437) and `test` (360).
"""

import contextlib
import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def digits_splits():
  """Returns {'train': (images, labels), 'test': (images, labels)}, uint8 0..255."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target.astype(np.int64)
  idx_train, idx_test = train_test_split(
      np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
      stratify=labels)
  return {'train': (images[idx_train], labels[idx_train]),
          'test': (images[idx_test], labels[idx_test])}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn handwritten digits (UCI optdigits test set), 8x8 grayscale."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 80/20 split of sklearn load_digits.'}
  # Nothing is downloaded. Overriding these keeps tfds from locating a
  # checksums file next to this module (which needs `importlib_resources`).
  url_infos = None
  code_path = None

  def _info(self):
    # Built directly: this module is not a registered tfds package, so the
    # metadata files that `dataset_info_from_configs` looks for do not exist.
    return tfds.core.DatasetInfo(
        builder=self,
        description='scikit-learn handwritten digits, 8x8 grayscale, PNG.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), encoding_format='png'),
            'label': tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = digits_splits()
    return {name: self._generate_examples(*arrays)
            for name, arrays in splits.items()}

  def _generate_examples(self, images, labels):
    import cv2  # pylint: disable=g-import-not-at-top
    for i, (img, label) in enumerate(zip(images, labels)):
      ok, png = cv2.imencode('.png', img)
      assert ok
      # Encoded bytes are stored as-is (encoding arrays would need TensorFlow).
      yield i, {'image': png.tobytes(), 'label': int(label)}


@contextlib.contextmanager
def file_lock(path: str):
  """An exclusive inter-process lock on `path` (created if missing)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def digits_builder(data_dir: str, prepare: bool = True) -> Digits:
  """Returns the Digits builder, preparing it (once, race-safely) if needed."""
  builder = Digits(data_dir=data_dir, file_format='array_record')
  if prepare and not builder.is_prepared():
    # tfds writes to an `incomplete.*` directory and renames it at the end;
    # the lock keeps two processes from generating it at the same time.
    with file_lock(os.path.join(data_dir, '.digits.lock')):
      builder = Digits(data_dir=data_dir, file_format='array_record')
      if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
        builder = Digits(data_dir=data_dir, file_format='array_record')
  return builder
