"""SIGTERM (preemption) as a flag that every process of a run agrees on.

`install()` is called first thing by `python -m vit_jax.main`, so a SIGTERM that lands
while the data, the model or the checkpoint are being set up is remembered rather than
killing the process; the run checks `requested()` between its start-up phases and stops
cleanly (nothing saved) if it is set, and the loop stops at the next step otherwise.
"""

import signal
import threading

import jax
import numpy as np

_requested = threading.Event()
_installed = {"previous": None, "done": False}


def _handle(signum, frame):
  del signum, frame
  _requested.set()


def install() -> bool:
  """Turns SIGTERM into the flag (main thread only); True if this call installed it first.

  Calling it again re-arms the handler: jax.distributed.initialize registers its own
  SIGTERM handler in C++ (its preemption notice), which replaces ours without Python
  knowing, so main calls this again after it.
  """
  if threading.current_thread() is not threading.main_thread():
    return False
  previous = signal.signal(signal.SIGTERM, _handle)
  # Restart interrupted system calls: a signal landing inside a blocking collective
  # (gloo/TCP on CPU) must not break it on this process only.
  signal.siginterrupt(signal.SIGTERM, False)
  if _installed["done"]:
    return False
  _installed.update(previous=previous, done=True)
  return True


def uninstall() -> None:
  """Puts back the SIGTERM handler that `install` replaced, and clears the flag."""
  if _installed["done"]:
    signal.signal(signal.SIGTERM, _installed["previous"])
    _installed.update(previous=None, done=False)
  _requested.clear()


def requested() -> bool:
  """Whether this process got SIGTERM (not agreed with the other processes)."""
  return _requested.is_set()


class PreemptionWatcher:
  """Turns SIGTERM into a flag that every process agrees on at the same step.

  Single-process: checked every step. Multi-process: the flags are combined with an
  all-gather every `sync_every` steps and at the first check, so all processes stop (and
  save) at the same step.
  """

  def __init__(self, sync_every: int):
    self._sync_every = max(1, int(sync_every))
    self._owns_handler = install()  # Library use without main: install here.
    self._first = True

  @property
  def requested(self) -> bool:
    return requested()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return requested()
    first, self._first = self._first, False
    if step % self._sync_every and not first:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(requested()))
    return bool(np.max(flags))

  def restore(self):
    if self._owns_handler:
      uninstall()
