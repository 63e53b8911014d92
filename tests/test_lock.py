"""The workdir lock: one run per workdir, the holder named, stale locks taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gcs_emulator import gcs, gcs_server  # pylint: disable=unused-import
from vit_jax.training import lock as lock_lib


def _dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, lock_lib.LOCK_FILE), "w", encoding="utf-8") as f:
    json.dump(dict({"start_time": time.time(), "heartbeat": time.time(), "token": "x"},
                   **record), f)


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with lock_lib.WorkdirLock(workdir) as first:
    holder = json.loads((tmp_path / "run" / "lock.json").read_text())
    assert holder["pid"] == os.getpid() and holder["token"] == first.token
    with pytest.raises(lock_lib.WorkdirLockedError,
                       match=rf"in use by another run \(host {socket.gethostname()}, "
                             rf"pid {os.getpid()}, started "):
      lock_lib.WorkdirLock(workdir).acquire()
  assert not (tmp_path / "run" / "lock.json").exists()  # Released.
  lock_lib.WorkdirLock(workdir).acquire().release()  # Free again.


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  pid = _dead_pid()
  _write(workdir, host=socket.gethostname(), pid=pid)
  lock = lock_lib.WorkdirLock(workdir).acquire()
  try:
    assert len(lock.messages) == 1
    assert "Taking over the stale lock" in lock.messages[0]
    assert f"pid {pid}" in lock.messages[0]
    assert json.loads((tmp_path / "run" / "lock.json").read_text())["token"] == lock.token
  finally:
    lock.release()


def test_another_hosts_lock_is_stale_only_after_its_heartbeat_stops(tmp_path):
  workdir = str(tmp_path / "run")
  _write(workdir, host="other-host", pid=1, heartbeat=time.time() - 5)
  with pytest.raises(lock_lib.WorkdirLockedError, match="host other-host, pid 1"):
    lock_lib.WorkdirLock(workdir, stale_after_s=60).acquire()
  _write(workdir, host="other-host", pid=1, heartbeat=time.time() - 120)
  lock = lock_lib.WorkdirLock(workdir, stale_after_s=60).acquire()
  assert "heartbeat 120 s ago" in lock.messages[0]
  lock.release()


def test_the_heartbeat_is_rewritten_and_a_replaced_lock_is_noticed(tmp_path):
  workdir = str(tmp_path / "run")
  lock = lock_lib.WorkdirLock(workdir, heartbeat_s=0.05).acquire()
  try:
    first = json.loads((tmp_path / "run" / "lock.json").read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / "run" / "lock.json").read_text())["heartbeat"] > first
    _write(workdir, host="elsewhere", pid=1, token="someone-else")
    time.sleep(0.3)
    assert lock.lost
  finally:
    lock.release()
  # Not ours any more: release leaves the other run's lock alone.
  assert json.loads((tmp_path / "run" / "lock.json").read_text())["token"] == "someone-else"


def test_object_store_path_uses_write_and_read_back(tmp_path, monkeypatch):
  """The gs:// protocol (write, settle, read back), run on a local path."""
  workdir = str(tmp_path / "run")
  lock = lock_lib.WorkdirLock(workdir, settle_s=0.0)
  lock.remote = True
  lock.acquire()
  assert json.loads((tmp_path / "run" / "lock.json").read_text())["token"] == lock.token
  lock.release()
  # A writer that lands while we settle wins (last writer wins); we give way.
  loser = lock_lib.WorkdirLock(workdir, settle_s=0.0)
  loser.remote = True
  monkeypatch.setattr(lock_lib.time, "sleep",
                      lambda _: _write(workdir, host="fast-host", pid=7, token="winner"))
  with pytest.raises(lock_lib.WorkdirLockedError, match="host fast-host, pid 7"):
    loser.acquire()


def test_a_gs_workdir_lock_refuses_a_second_run_and_takes_over_a_stale_one(gcs):
  """The object-store protocol against the emulator: a real bucket, not a local path."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  workdir = gcs.bucket() + "/run"
  lock_file = epath.Path(workdir) / lock_lib.LOCK_FILE
  first = lock_lib.WorkdirLock(workdir, settle_s=0.05, heartbeat_s=0.2).acquire()
  assert first.remote
  try:
    assert json.loads(lock_file.read_text())["token"] == first.token
    with pytest.raises(lock_lib.WorkdirLockedError,
                       match=rf"in use by another run \(host {socket.gethostname()}, "
                             rf"pid {os.getpid()}, started .*{lock_file}"):
      lock_lib.WorkdirLock(workdir, settle_s=0.05).acquire()
    beat = json.loads(lock_file.read_text())["heartbeat"]
    time.sleep(0.6)
    assert json.loads(lock_file.read_text())["heartbeat"] > beat  # Kept alive in the bucket.
  finally:
    first.release()
  assert not lock_file.exists()
  # A run on another host that died without releasing: stale once its heartbeat is old.
  lock_file.write_text(json.dumps({"host": "dead-host", "pid": 3, "token": "gone",
                                   "start_time": time.time() - 900,
                                   "heartbeat": time.time() - 700}))
  taker = lock_lib.WorkdirLock(workdir, settle_s=0.05, stale_after_s=600).acquire()
  try:
    assert "host dead-host, pid 3" in taker.messages[0]
    assert json.loads(lock_file.read_text())["token"] == taker.token
  finally:
    taker.release()
