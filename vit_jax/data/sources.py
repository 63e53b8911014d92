"""Resolves `config.dataset` to metadata and random-access sources per split.

`config.dataset` is one of
  * 'digits': the embedded scikit-learn digits, prepared on first use;
  * a tfds name ('cifar10', 'cifar100', 'oxford_iiit_pet', 'oxford_flowers102',
    'imagenet2012', ...) prepared as ArrayRecord with `python -m vit_jax.prepare`;
  * an image folder ROOT/{train,test}/<class>/*.jpg (a path that exists or
    contains a path separator).
Every source returns records {'image': encoded bytes, 'label': int, 'path': str}.
"""

import dataclasses
import logging
import os

import tensorflow_datasets as tfds

from vit_jax.data import digits as digits_lib
from vit_jax.data import folder as folder_lib
from vit_jax.data.errors import DatasetNotPreparedError
from vit_jax.data.errors import UnknownDatasetError

KNOWN_DATASETS = ('digits', 'cifar10', 'cifar100', 'oxford_iiit_pet',
                  'oxford_flowers102', 'imagenet2012')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  num_examples: dict  # split string -> int (configured train and eval splits)


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(
      os.path.expanduser('~'), 'tensorflow_datasets')


def data_dir_of(config) -> str:
  return os.path.expanduser(config.data_dir or default_data_dir())


def is_folder_spec(name: str) -> bool:
  """A path (has a separator, starts with . or ~) or an existing directory
  whose name is not also a tfds dataset name (tfds names win then; write
  ./NAME to mean the folder)."""
  if os.sep in name or name.startswith(('.', '~')):
    return True
  if not os.path.isdir(name):
    return False
  try:
    tfds.builder_cls(name)
  except Exception:  # pylint: disable=broad-except
    return True
  return False


def prepare_command(name: str, data_dir: str) -> str:
  return f'python -m vit_jax.prepare {name} --data_dir {data_dir}'


class TfdsSource:
  """Random-access records of a tfds ArrayRecord split, image bytes undecoded."""

  def __init__(self, builder, split: str):
    features = builder.info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not images or not labels:
      raise UnknownDatasetError(
          f'tfds dataset {builder.name!r} has no image + class label features '
          f'(features: {list(features)}); it cannot be used for classification.')
    self._image_key = 'image' if 'image' in images else images[0]
    self._label_key = 'label' if 'label' in labels else labels[0]
    self._has_file_name = 'file_name' in features
    self._desc = f'{builder.name}/{split}'
    # Keep every image feature encoded: the pipeline decodes with OpenCV, and
    # other images (e.g. segmentation masks) are not needed at all.
    self._source = builder.as_data_source(
        split=split, decoders={k: tfds.decode.SkipDecoding() for k in images})

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    rec = self._source[i]
    path = f'{self._desc}[{i}]'
    if self._has_file_name:
      fn = rec['file_name']
      path += ' ' + (fn.decode() if isinstance(fn, bytes) else str(fn))
    return {'image': rec[self._image_key], 'label': int(rec[self._label_key]),
            'path': path}


class ResolvedDataset:
  """Metadata and sources for one dataset spec."""

  def __init__(self, name, class_names, make_source, split_sizes):
    self.name = name
    self.class_names = tuple(class_names)
    self._make_source = make_source
    self._split_sizes = split_sizes

  def num_examples(self, split: str) -> int:
    return self._split_sizes(split)

  def source(self, split: str):
    return self._make_source(split)


def _tfds_resolved(builder, name=None) -> ResolvedDataset:
  names = None
  for f in builder.info.features.values():
    if isinstance(f, tfds.features.ClassLabel):
      names = f.names
      break
  if names is None:
    raise UnknownDatasetError(
        f'tfds dataset {builder.name!r} has no ClassLabel feature.')

  def split_size(split):
    try:
      return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(f'Unknown split {split!r} for {builder.name!r}; available: '
                       f'{sorted(builder.info.splits)} (slices like '
                       f'"train[:98%]" are allowed). ({e})') from None
  return ResolvedDataset(name or builder.name, names,
                         lambda split: TfdsSource(builder, split), split_size)


def _check_array_record(builder, name, data_dir):
  fmt = builder.info.file_format
  fmt = getattr(fmt, 'value', fmt)
  if fmt != 'array_record':
    raise DatasetNotPreparedError(
        f'Dataset {name!r} in {builder.data_dir} is stored as {fmt!r}, but '
        'random access needs ArrayRecord. Re-create it with: '
        f'{prepare_command(name, data_dir)} --overwrite')


def resolve(config) -> ResolvedDataset:
  """Resolves config.dataset / config.data_dir; prepares 'digits' if needed."""
  name = config.dataset
  data_dir = data_dir_of(config)
  if name == 'digits':
    remote = '://' in data_dir
    builder = digits_lib.digits_builder(data_dir, prepare=not remote)
    if remote and not builder.is_prepared():
      raise DatasetNotPreparedError(
          f'data_dir {data_dir}: the digits dataset is prepared on first use on local '
          'disk only (under a file lock). Set config.data_dir to a local directory, or '
          'copy a prepared one there: gcloud storage cp -r '
          f'~/tensorflow_datasets/digits {data_dir}/')
    return _tfds_resolved(builder)
  if is_folder_spec(name):
    root = os.path.abspath(os.path.expanduser(name))
    if not os.path.isdir(root):
      raise UnknownDatasetError(
          f'Image folder {root!r} (config.dataset) does not exist. Use an existing '
          'folder ROOT/{train,test}/<class>/*.jpg or a tfds name such as '
          f'{", ".join(KNOWN_DATASETS)}.')
    prepared = folder_lib.prepared_dir(root, data_dir)
    if os.path.exists(os.path.join(prepared, 'dataset_info.json')):
      logging.info('Reading the ArrayRecord copy of %s prepared in %s (re-run '
                   'the prepare command with --overwrite after changing the '
                   'folder).', root, prepared)
      return _tfds_resolved(tfds.builder_from_directory(prepared),
                            os.path.basename(root.rstrip(os.sep)))
    class_names, examples = folder_lib.scan_folder(root)

    def source(split):
      return folder_lib.FolderSource(folder_lib.select_split(examples, split, root))
    return ResolvedDataset(os.path.basename(root.rstrip(os.sep)), class_names,
                           source, lambda split: len(source(split)))
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UnknownDatasetError(
        f'Unknown dataset {name!r}: it is not a tfds dataset name and no folder of '
        f'that name exists. Use "digits" (built in), a tfds name such as '
        f'{", ".join(KNOWN_DATASETS[1:])}, or the path of an image folder '
        'ROOT/{train,test}/<class>/*.jpg.') from e
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f'Dataset {name!r} is not prepared in data_dir {data_dir!r}. Prepare it '
        f'(as ArrayRecord) with:\n  {prepare_command(name, data_dir)}\n'
        '(add --manual_dir DIR for datasets that need manually downloaded files, '
        'e.g. imagenet2012), or set config.data_dir to where it was prepared.')
  _check_array_record(builder, name, data_dir)
  return _tfds_resolved(builder)


def get_info(config) -> DatasetInfo:
  """Name, classes and the sizes of the configured train and eval splits."""
  ds = resolve(config)
  splits = (config.train_split, config.eval_split)
  return DatasetInfo(
      name=ds.name, num_classes=len(ds.class_names), class_names=ds.class_names,
      num_examples={s: ds.num_examples(s) for s in splits})
