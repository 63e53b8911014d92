"""One run per workdir: a lock file naming the run that holds it, kept alive by a heartbeat.

  WORKDIR/lock.json   {"host", "pid", "start_time", "heartbeat", "token"}

`WorkdirLock(workdir).acquire()` writes the lock or raises `WorkdirLockedError` naming the
run that holds it (host, pid, start time). A lock is *stale*, and is taken over with a
message, when
  * it was written on this host and its pid is no longer alive, or
  * its heartbeat (rewritten every `heartbeat_s` by a daemon thread) is older than
    `stale_after_s`: the way to tell for a run on another host, which we cannot ask.
`release()` removes the lock if it is still ours.

How the lock is made exclusive, per filesystem:
  * Local (and NFS/Lustre) paths: `os.open(O_CREAT | O_EXCL)` creates the file only if it
    is absent, atomically, so of two runs started together exactly one gets it. Taking
    over a stale lock first renames the stale file aside (a rename of a given name
    succeeds once), then creates anew.
  * gs:// and other object stores, through etils.epath: there is no create-if-absent.
    GCS itself has one (a write with the precondition `ifGenerationMatch=0`), but epath's
    `write_text` does not expose preconditions. So the lock is written, then after
    `settle_s` read back: if the token read is not ours another run wrote after us and
    we give way. GCS writes are strongly consistent (read-after-write), so the last
    writer wins and both runs read the same winner; the race window is two runs that
    both find no lock and write within `settle_s` of each other *and* the slower one
    reads back before the faster one's write lands, which GCS's ordering makes
    practically impossible, but it is not a formal guarantee. The heartbeat thread
    re-reads the lock each beat and warns (`lost`) if another token replaced ours.

Several processes of one multi-host run share the workdir: only process 0 takes the lock
(they are one run); the other processes learn whether it succeeded from a broadcast, so
all stop together when another run holds the workdir (see `acquire_for_run`).
"""

import datetime
import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from vit_jax import storage

LOCK_FILE = "lock.json"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _now() -> float:
  return time.time()


def _iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _pid_alive(pid) -> bool:
  """Whether a process with this pid exists on this host (signal 0 only asks)."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # It exists, under another user.
  return True


def describe(holder: dict) -> str:
  """'host h, pid 123, started 2024-05-01 12:00:00, heartbeat 4 s ago'."""
  age = _now() - float(holder.get("heartbeat", 0))
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
          f"{_iso(float(holder.get('start_time', 0)))}, heartbeat {age:.0f} s ago")


class WorkdirLock:
  """The lock of one workdir (local or gs://); see the module docstring.

  Args:
    workdir: the run's workdir (created if absent when the lock is taken).
    stale_after_s: a heartbeat older than this marks the lock stale (other hosts).
    heartbeat_s: how often the holder rewrites its heartbeat.
    settle_s: object stores only: the wait between writing and reading back.
  """

  def __init__(self, workdir, *, stale_after_s: float = 600.0, heartbeat_s: float = 30.0,
               settle_s: float = 1.0):
    self.workdir = storage.as_path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.stale_after_s, self.heartbeat_s = float(stale_after_s), float(heartbeat_s)
    self.settle_s = float(settle_s)
    self.remote = storage.is_remote(self.path)
    self.token = uuid.uuid4().hex
    self.start_time = _now()
    self.lost = False
    self.messages = []  # What acquire() had to say (a takeover), for the run's log.
    self._stop = threading.Event()
    self._thread = None

  def _record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": self.start_time,
            "heartbeat": _now(), "token": self.token}

  def read(self):
    """The holder's record, or None when there is no lock (or it is unreadable)."""
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
      return None

  def is_stale(self, holder: dict) -> bool:
    """Its pid is dead on this host, or its heartbeat is older than stale_after_s."""
    same_host = holder.get("host") == socket.gethostname()
    if same_host and not _pid_alive(holder.get("pid", -1)):
      return True
    return _now() - float(holder.get("heartbeat", 0)) > self.stale_after_s

  def _refuse(self, holder):
    raise WorkdirLockedError(
        f"The workdir {self.workdir} is in use by another run ({describe(holder)}); "
        f"its lock is {self.path}. Wait for it to finish or stop it, or use another "
        f"--workdir. If that run is gone (e.g. its host died), the lock counts as stale "
        f"once its heartbeat is older than {self.stale_after_s:.0f} s "
        "(config.lock_stale_after_s), or delete the lock file.")

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (or a stale one over); WorkdirLockedError if a live run holds it."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    holder = self.read()
    if holder is not None and holder.get("token") != self.token:
      if not self.is_stale(holder):
        self._refuse(holder)
      self.messages.append(f"Taking over the stale lock of a run that is gone "
                           f"({describe(holder)}).")
      self._remove_stale(holder)
    if self.remote:
      self._write_and_verify()
    else:
      self._create_exclusive()
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()
    return self

  def _remove_stale(self, holder):
    if self.remote:
      return  # Overwritten by _write_and_verify.
    aside = self.path.parent / f"{LOCK_FILE}.stale-{self.token}"
    try:
      os.rename(self.path, aside)  # Only one of several runs taking over gets the rename.
    except FileNotFoundError:
      return  # Another run took it over first: _create_exclusive decides.
    moved = self.read_file(aside)
    os.remove(aside)
    if moved is not None and moved.get("token") != holder.get("token"):
      # We moved a lock written after we read the stale one: its owner is live.
      self._refuse(moved)

  @staticmethod
  def read_file(path):
    try:
      return json.loads(epath.Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
      return None

  def _create_exclusive(self):
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = self.read() or {"host": "?", "pid": "?"}
      self._refuse(holder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(self._record(), f)

  def _write_and_verify(self):
    self.path.write_text(json.dumps(self._record()))
    time.sleep(self.settle_s)
    holder = self.read()
    if holder is None or holder.get("token") != self.token:
      self._refuse(holder or {"host": "?", "pid": "?"})

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      holder = self.read()
      if holder is None or holder.get("token") != self.token:
        self.lost = True
        return
      record = dict(self._record(), start_time=self.start_time)
      try:
        self.path.write_text(json.dumps(record))
      except OSError:
        pass  # A missed beat; the next one retries.

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
      holder = self.read()
      if holder is not None and holder.get("token") == self.token:
        self.path.unlink(missing_ok=True)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def acquire_for_run(workdir, *, stale_after_s: float, heartbeat_s: float,
                    report=print):
  """The run's lock: taken by process 0; every process raises if process 0 could not.

  Returns the WorkdirLock on process 0, None on the others. `report` prints a takeover.
  """
  import jax  # pylint: disable=g-import-not-at-top
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, stale_after_s=stale_after_s,
                         heartbeat_s=heartbeat_s).acquire()
      for line in lock.messages:
        report(line)
    except (WorkdirLockedError, OSError) as e:
      error = str(e)
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    if int(failed) and not error:
      error = (f"Process 0 could not lock the workdir {workdir} (another run holds it); "
               "see process 0's output.")
  if error:
    raise WorkdirLockedError(error)
  return lock
