"""SIGTERM (preemption) as a flag that every process of a run agrees on."""

import signal
import threading

import jax
import numpy as np


class PreemptionWatcher:
  """Turns SIGTERM into a flag that every process agrees on at the same step.

  Single-process: checked every step. Multi-process: the flags are combined with an
  all-gather every `sync_every` steps, so all processes stop (and save) at the same step.
  """

  def __init__(self, sync_every: int):
    self.requested = False
    self._sync_every = max(1, int(sync_every))
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      # Restart interrupted system calls: a signal landing inside a blocking collective
      # (gloo/TCP on CPU) must not break it on this process only.
      signal.siginterrupt(signal.SIGTERM, False)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % self._sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
