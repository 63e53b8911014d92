"""Image folders: ROOT/{train,test}/<class>/*.{jpg,jpeg,png,webp,bmp}.

A folder can be read directly (files are read and decoded on the fly), or
converted to ArrayRecord with `python -m vit_jax.prepare ROOT`; a prepared
copy in `data_dir` is used automatically when it exists.
"""

import hashlib
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from vit_jax.data.errors import EmptyDatasetError
from vit_jax.data.errors import UnknownDatasetError
from vit_jax.data.images import IMAGE_EXTENSIONS

_SPLIT_RE = re.compile(r'^(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$')


def parse_split(split: str):
  """'train[10%:90%]' -> ('train', '10%', '90%'); 'test' -> ('test', None, None)."""
  m = _SPLIT_RE.match(split.replace(' ', ''))
  if not m:
    raise ValueError(f'Cannot parse split {split!r}; use e.g. "train", '
                     '"train[:98%]", "train[98%:]" or "test[:100]".')
  return m.group(1), m.group(2), m.group(3)


def slice_bounds(n: int, start, stop):
  """Resolves tfds-style slice boundaries ('10%', '-5', None) on n examples."""
  def resolve(b, default):
    if b is None:
      return default
    v = (int(round(float(b[:-1]) * n / 100.0)) if b.endswith('%') else int(b))
    if v < 0:
      v += n
    return min(max(v, 0), n)
  return resolve(start, 0), resolve(stop, n)


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def scan_folder(root: str):
  """Returns (class_names, {split: [(path, label), ...]}) for an image folder.

  Class names are the sorted union of class folder names over all splits, so
  labels agree between splits. Raises clear errors for empty folders and
  class folders without images.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise UnknownDatasetError(
        f'Image folder {root!r} does not exist. config.dataset must be a tfds '
        'name (e.g. "digits", "cifar10") or a folder laid out as '
        'ROOT/{train,test}/<class>/*.jpg.')
  splits = sorted(d for d in os.listdir(root)
                  if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))
  layout = ('Expected ROOT/<split>/<class>/<image> with split folders such as '
            f'train/ and test/ and images ending in {", ".join(IMAGE_EXTENSIONS)}.')
  if not splits:
    raise EmptyDatasetError(f'Image folder {root!r} is empty (no split folders). {layout}')
  per_split = {}
  for split in splits:
    split_dir = os.path.join(root, split)
    classes = sorted(d for d in os.listdir(split_dir)
                     if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith('.'))
    if not classes:
      raise EmptyDatasetError(
          f'Split folder {split_dir!r} has no class folders. {layout}')
    per_split[split] = {}
    for cls in classes:
      cls_dir = os.path.join(split_dir, cls)
      files = sorted(f for f in os.listdir(cls_dir)
                     if _is_image(f) and os.path.isfile(os.path.join(cls_dir, f)))
      if not files:
        raise EmptyDatasetError(
            f'Class folder {cls_dir!r} contains no images (looked for files '
            f'ending in {", ".join(IMAGE_EXTENSIONS)}). Add images or remove the '
            'folder.')
      per_split[split][cls] = [os.path.join(cls_dir, f) for f in files]
  class_names = sorted({c for s in per_split.values() for c in s})
  label_of = {c: i for i, c in enumerate(class_names)}
  examples = {
      split: [(p, label_of[c]) for c in sorted(classes) for p in classes[c]]
      for split, classes in per_split.items()}
  return tuple(class_names), examples


def select_split(examples: dict, split: str, root: str):
  """Applies a tfds-style split string to the scanned folder examples."""
  name, start, stop = parse_split(split)
  if name not in examples:
    raise EmptyDatasetError(
        f'Split {name!r} not found in image folder {root!r}; it has '
        f'{sorted(examples)}. Create {os.path.join(root, name)}/<class>/ or set '
        'config.train_split / config.eval_split.')
  items = examples[name]
  lo, hi = slice_bounds(len(items), start, stop)
  if hi <= lo:
    raise EmptyDatasetError(f'Split {split!r} of {root!r} selects no examples.')
  return items[lo:hi]


class FolderSource:
  """Random-access source over image files: record i -> dict(image bytes, label)."""

  def __init__(self, items):
    self._paths = [p for p, _ in items]
    self._labels = np.asarray([l for _, l in items], np.int64)

  def __len__(self):
    return len(self._paths)

  def __getitem__(self, i):
    path = self._paths[i]
    with open(path, 'rb') as f:
      data = f.read()
    return {'image': data, 'label': int(self._labels[i]), 'path': path}


def prepared_name(root: str) -> str:
  """The tfds builder config name of a folder: basename + short path hash."""
  root = os.path.abspath(os.path.expanduser(root))
  base = re.sub(r'[^a-z0-9_]+', '_', os.path.basename(root.rstrip(os.sep)).lower())
  digest = hashlib.sha1(root.encode()).hexdigest()[:8]
  return f'{base.strip("_") or "folder"}_{digest}'


def prepared_dir(root: str, data_dir: str) -> str:
  return os.path.join(data_dir, ImageFolderArrayRecord.name, prepared_name(root),
                      str(ImageFolderArrayRecord.VERSION))


class ImageFolderArrayRecord(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Converts an image folder to ArrayRecord (encoded file bytes, unchanged)."""

  name = 'image_folder'
  VERSION = tfds.core.Version('1.0.0')
  url_infos = None
  code_path = None

  def __init__(self, root: str, **kwargs):
    self._root = os.path.abspath(os.path.expanduser(root))
    self._class_names, self._examples = scan_folder(self._root)
    config = tfds.core.BuilderConfig(name=prepared_name(self._root),
                                     description=f'Images from {self._root}')
    super().__init__(config=config, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Image folder {self._root}',
        features=tfds.features.FeaturesDict({
            # Bytes are stored as found on disk (jpeg/png/webp/bmp).
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=list(self._class_names)),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(items)
            for split, items in self._examples.items()}

  def _generate_examples(self, items):
    for path, label in items:
      with open(path, 'rb') as f:
        data = f.read()
      rel = os.path.relpath(path, self._root)
      yield rel, {'image': data, 'label': label, 'file_name': rel}
