"""A resumable iterator over the pipeline's numpy batches (the state a checkpoint saves)."""

import json

import numpy as np

_STATE_VERSION = 1


class DataIterator:
  """Iterator over numpy batches with get_state()/set_state() and close().

  The state is a JSON-serialisable dict: the grain iterator state plus the
  identity of the pipeline (seed, split size, process layout, batch size,
  workers), which `set_state` checks so a mismatched restore fails loudly.
  """

  def __init__(self, dataset, identity: dict, transform):
    self._dataset = dataset
    self._identity = identity
    self._transform = transform
    self._copy = identity.get('data_workers', 0) > 0
    self._it = iter(dataset)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    if self._copy:
      # Batches from workers live in shared memory; plain arrays free it now
      # (and avoid grain's shared-memory finalisers at interpreter exit).
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  @property
  def num_corrupt_skipped(self) -> int:
    """Corrupt images skipped in this process (workers log theirs)."""
    return self._transform.num_skipped

  def get_state(self) -> dict:
    return {'version': _STATE_VERSION, 'pipeline': dict(self._identity),
            'grain': json.dumps(self._it.get_state(), sort_keys=True)}

  def set_state(self, state) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if state.get('version') != _STATE_VERSION:
      raise ValueError(f'Unsupported data iterator state version: {state.get("version")}.')
    saved = dict(state['pipeline'])
    if saved != self._identity:
      diff = {k: (saved.get(k), self._identity.get(k))
              for k in set(saved) | set(self._identity)
              if saved.get(k) != self._identity.get(k)}
      raise ValueError('Data iterator state was saved by a different pipeline; '
                       f'(saved, current) differ in: {diff}.')
    self._it.set_state(json.loads(state['grain']))

  def close(self) -> None:
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
