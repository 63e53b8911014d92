"""grain input pipelines: train (infinite, shuffled), eval (one padded pass).

Records are read by global index from a random-access source (tfds ArrayRecord
or an image folder), decoded with OpenCV and augmented in grain (in-process
threads, or `config.data_workers` worker processes), and batched as uint8.

Train order: epoch e uses the permutation of all N examples drawn from
(seed, e); process p of P takes positions p, p+P, p+2P, ... of it (N // P
examples each, so every process yields the same number of batches). The
augmentation randomness of an example is drawn from (seed, epoch, global
index), so results do not depend on workers, threads or process count.
RandAugment (`config.pp.randaugment = (N, M)`) and random erasing
(`config.pp.random_erase`) run after the crop and flip on the same per-example
generator, so they share that property and resume exactly. Repeated augmentation
(`config.pp.repeated_aug = r`, DeiT's) puts each example r times in a row in the
epoch's order (N positions, so N / r distinct examples), copy c drawing its own
randomness; over P >= r processes the copies of one example go to different processes.
"""

import collections
import logging
import math
import sys

import grain
import numpy as np

from vit_jax.data import images as images_lib
from vit_jax.data import randaugment as randaugment_lib
from vit_jax.data import random_erasing
from vit_jax.data import sources
from vit_jax.data.errors import CorruptImageError
from vit_jax.data.iterator import DataIterator


def _processes(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count}).')
  return int(process_index), int(process_count)


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'{what}={global_batch} must be a positive multiple of the '
                     f'number of processes ({process_count}).')
  return global_batch // process_count


def _seed_words(seed: int):
  return int(seed) & 0xFFFFFFFFFFFFFFFF


class _TrainOrder:
  """Infinite sequence i -> (epoch, global example index[, copy]) for one process."""

  def __init__(self, num_examples, seed, process_index, process_count, repeats=1):
    self._n, self._repeats = num_examples, int(repeats)
    self._seed = _seed_words(seed)
    self._pi, self._pc = process_index, process_count
    self._per_process = num_examples // process_count
    if self._per_process == 0:
      raise ValueError(f'{num_examples} training examples cannot be split over '
                       f'{process_count} processes.')
    self._cache = None

  def __len__(self):
    return sys.maxsize

  def _permutation(self, epoch):
    cache = self._cache
    if cache is None or cache[0] != epoch:
      perm = np.random.default_rng((self._seed, epoch, 0)).permutation(self._n)
      cache = self._cache = (epoch, perm)
    return cache[1]

  def __getitem__(self, i):
    epoch, j = divmod(int(i), self._per_process)
    position = j * self._pc + self._pi
    if self._repeats == 1:
      return epoch, int(self._permutation(epoch)[position])
    k, copy = divmod(position, self._repeats)
    return epoch, int(self._permutation(epoch)[k]), copy

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_cache'] = None
    return state


class _EvalOrder:
  """Local position k -> global index k * P + p, or -1 for padding."""

  def __init__(self, num_examples, length, process_index, process_count):
    self._n, self._len = num_examples, length
    self._pi, self._pc = process_index, process_count

  def __len__(self):
    return self._len

  def __getitem__(self, k):
    g = int(k) * self._pc + self._pi
    return g if g < self._n else -1


class _Decode:
  """Shared decode with the corrupt-image policy."""

  def __init__(self, source, crop, skip_corrupt):
    self.source, self.crop, self.skip_corrupt = source, crop, skip_corrupt
    self.num_skipped = 0

  def read(self, index):
    rec = self.source[index]
    try:
      return images_lib.decode_image(rec['image'], rec.get('path', str(index))), rec
    except CorruptImageError as e:
      if not self.skip_corrupt:
        raise
      self.num_skipped += 1
      logging.warning('Skipping corrupt image (%d so far): %s', self.num_skipped, e.path)
      return None, rec


def randaugment_from_config(config):
  """`config.pp.randaugment` (N, M) as a RandAugment, or None when unset.

  `config.pp.randaugment_ops` picks the op list (None: randaugment.DEFAULT_OPS),
  `config.pp.randaugment_magnitude_std` timm's magnitude noise (0 = off).
  Raises ValueError naming the field for a malformed value, an op count below 0, a
  magnitude outside [0, 30], a negative noise or an unknown op name.
  """
  value, std = config.pp.randaugment, config.pp.randaugment_magnitude_std
  if value is None:  # Off; a noise that could never be right is still refused.
    try:
      randaugment_lib.check_magnitude_std(std)
    except ValueError as e:
      raise ValueError(f'config.pp.randaugment_magnitude_std={std!r}: {e}') from None
    return None
  if isinstance(value, str) or len(tuple(value)) != 2:
    raise ValueError(f'config.pp.randaugment must be (num_ops, magnitude), e.g. (2, 15), '
                     f'or None; got {value!r}.')
  num_ops, magnitude = tuple(value)
  ops = config.pp.randaugment_ops
  try:
    return randaugment_lib.RandAugment(
        num_ops, magnitude, None if ops is None else tuple(ops),
        magnitude_std=std)
  except ValueError as e:
    raise ValueError(f'config.pp.randaugment={tuple(value)!r}, config.pp.randaugment_ops='
                     f'{ops!r}, config.pp.randaugment_magnitude_std={std!r}: {e}') from None


class _TrainMap(_Decode):

  def __init__(self, source, crop, skip_corrupt, seed, area_range, flip, randaugment=None,
               erase_prob=0.0):
    super().__init__(source, crop, skip_corrupt)
    self.seed, self.area_range, self.flip = _seed_words(seed), tuple(area_range), flip
    self.randaugment, self.erase_prob = randaugment, float(erase_prob)

  def __call__(self, element):
    epoch, g, *copy = element
    img, rec = self.read(g)
    # A skipped corrupt image is replaced by the next readable one, so batches
    # keep their size (and can be formed before the worker split).
    tries = 1
    while img is None:
      if tries >= min(len(self.source), 100):
        raise CorruptImageError(rec.get('path', str(g)), 'and too many following '
                                'images are corrupt as well')
      g = (g + 1) % len(self.source)
      img, rec = self.read(g)
      tries += 1
    rng = np.random.default_rng((self.seed, epoch, g, 1, *copy))
    img = images_lib.train_transform(img, rng, self.crop, self.area_range, self.flip)
    if self.randaugment is not None:
      img = self.randaugment(img, rng)
    img = random_erasing.random_erase(img, rng, self.erase_prob)
    return {'image': img, 'label': np.int32(rec['label'])}


class _EvalMap(_Decode):

  def __init__(self, source, crop, skip_corrupt, mode):
    super().__init__(source, crop, skip_corrupt)
    self.mode = mode

  def _pad(self):
    return {'image': np.zeros((self.crop, self.crop, 3), np.uint8),
            'label': np.int32(0), 'mask': np.bool_(False)}

  def __call__(self, g):
    if g < 0:
      return self._pad()
    img, rec = self.read(g)
    if img is None:  # skipped corrupt image: masked out like padding
      return self._pad()
    img = images_lib.eval_transform(img, self.crop, self.mode)
    return {'image': img, 'label': np.int32(rec['label']), 'mask': np.bool_(True)}


def _finish(ds, config, local_batch, drop_remainder):
  workers = int(config.data_workers)
  threads = int(config.data_threads)
  # Batches are formed on the random-access dataset, so each batch holds the
  # same examples whatever the number of workers or threads.
  ds = ds.batch(local_batch, drop_remainder=drop_remainder)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(threads, 2)))
  if workers > 0:
    # Worker processes read absl flags; outside absl.app.run they are unparsed.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds, workers


def make_train_iterator(config, *, seed: int, process_index=None, process_count=None):
  """Infinite iterator of {'image': uint8 [B, crop, crop, 3], 'label': int32 [B]}.

  B = config.batch_size // process_count. Global shuffle each epoch.
  """
  pi, pc = _processes(process_index, process_count)
  local_batch = _local_batch(config.batch_size, pc, 'config.batch_size')
  ds_spec = sources.resolve(config)
  split = config.train_split
  source = ds_spec.source(split)
  n = len(source)
  crop = int(config.pp.crop)
  randaugment = randaugment_from_config(config)
  erase, repeats = float(config.pp.random_erase), int(config.pp.repeated_aug)
  transform = _TrainMap(source, crop, bool(config.pp.skip_corrupt), seed,
                        config.pp.area_range, bool(config.pp.flip), randaugment, erase)
  ds = grain.MapDataset.source(_TrainOrder(n, seed, pi, pc, repeats)).map(transform)
  ds, workers = _finish(ds, config, local_batch, drop_remainder=True)
  identity = {'kind': 'train', 'dataset': ds_spec.name, 'split': split,
              'num_examples': n, 'seed': int(seed), 'process_index': pi,
              'process_count': pc, 'local_batch': local_batch, 'crop': crop,
              'data_workers': workers}
  if randaugment is not None:  # Only when set, so earlier checkpoints still resume.
    identity['randaugment'] = [randaugment.num_ops, randaugment.magnitude,
                               list(randaugment.ops)]
    if randaugment.magnitude_std:
      identity['randaugment'].append(randaugment.magnitude_std)
  for name, value, off in (('random_erase', erase, 0.0), ('repeated_aug', repeats, 1)):
    if value != off:
      identity[name] = value
  return DataIterator(ds, identity, transform)


def _eval_layout(config, split, process_count, n):
  eval_batch = config.eval_batch_size or config.batch_size  # None: the training batch.
  local_batch = _local_batch(eval_batch, process_count, 'config.eval_batch_size')
  per_process = -(-n // process_count)
  return local_batch, max(1, math.ceil(per_process / local_batch))


def num_eval_batches(config, split=None, process_count=None) -> int:
  """Number of eval batches; the same on every process."""
  _, pc = _processes(0 if process_count is not None else None, process_count)
  split = split or config.eval_split
  n = sources.resolve(config).num_examples(split)
  return _eval_layout(config, split, pc, n)[1]


def make_eval_iterator(config, *, split=None, process_index=None, process_count=None):
  """One full pass: {'image', 'label', 'mask'}; padding has mask=False.

  Process p gets examples p, p+P, ...; every example appears exactly once
  across processes, and all processes yield num_eval_batches() batches.
  """
  pi, pc = _processes(process_index, process_count)
  split = split or config.eval_split
  ds_spec = sources.resolve(config)
  source = ds_spec.source(split)
  n = len(source)
  local_batch, batches = _eval_layout(config, split, pc, n)
  crop = int(config.pp.crop)
  transform = _EvalMap(source, crop, bool(config.pp.skip_corrupt), config.pp.eval_mode)
  ds = grain.MapDataset.source(_EvalOrder(n, batches * local_batch, pi, pc)).map(transform)
  ds, workers = _finish(ds, config, local_batch, drop_remainder=False)
  identity = {'kind': 'eval', 'dataset': ds_spec.name, 'split': split,
              'num_examples': n, 'process_index': pi, 'process_count': pc,
              'local_batch': local_batch, 'crop': crop, 'data_workers': workers}
  return DataIterator(ds, identity, transform)


def to_global(batch: dict, mesh, batch_axes=('data',)) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded on the leading axis."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


class MeshPrefetcher:
  """Iterator of to_global'd batches, keeping `size` batches in flight.

  get_state() returns the state of the wrapped iterator *before* the next batch
  this prefetcher will yield, so a checkpoint resumes exactly at that batch even
  though later batches were already read ahead.
  """

  def __init__(self, iterator, mesh, size=2, batch_axes=('data',)):
    self._iterator, self._mesh = iterator, mesh
    self._size, self._axes = max(1, int(size)), tuple(batch_axes)
    self._queue = collections.deque()
    self._has_state = hasattr(iterator, 'get_state')
    self._it = iter(iterator)
    self._exhausted = False

  def _fill(self):
    while not self._exhausted and len(self._queue) < self._size:
      state = self._iterator.get_state() if self._has_state else None
      try:
        batch = next(self._it)
      except StopIteration:
        self._exhausted = True
        break
      self._queue.append((state, to_global(batch, self._mesh, self._axes)))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()[1]

  def get_state(self):
    self._fill()
    return self._queue[0][0] if self._queue else self._iterator.get_state()

  def set_state(self, state):
    self._queue.clear()
    self._exhausted = False
    self._iterator.set_state(state)

  def close(self):
    self._queue.clear()
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()


def prefetch_to_mesh(iterator, mesh, size=2, batch_axes=('data',)):
  """Wraps a batch iterator: yields global jax.Arrays, `size` batches ahead."""
  return MeshPrefetcher(iterator, mesh, size, batch_axes)
