"""Two processes (2 CPU devices each) on 127.0.0.1: SIGTERM to one of them stops both at
the same step, with one checkpoint, and a rerun of both resumes and finishes; with the
newest checkpoint damaged, both resume from the one before."""

import glob
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from trainer_fixtures import REPO, TINY_FLAGS, as_flags
from vit_jax import checkpoints
from vit_jax.models import params as names
from vit_jax.training import reporting

TOTAL_STEPS = 60
SYNC_EVERY = 5
TIMEOUT = 90


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_pair(workdir):
  port = _free_port()
  flags = dict(TINY_FLAGS, total_steps=TOTAL_STEPS, log_every=5, eval_every=0,
               checkpoint_every=20, batch_size=32, eval_batch_size=64,
               preemption_sync_every=SYNC_EVERY)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONFAULTHANDLER="1",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  procs = []
  for pid in range(2):
    dist = {"distributed.coordinator_address": f"127.0.0.1:{port}",
            "distributed.num_processes": 2, "distributed.process_id": pid}
    command = [sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}",
               *as_flags(flags), *as_flags(dist)]
    procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, returncode=0) -> list[str]:
  """Waits for both; on a hang, their Python stacks (faulthandler) are in the failure."""
  outs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.send_signal(signal.SIGABRT)
      dumps = [p.communicate()[0][-4000:] for p in procs]
      raise AssertionError("Processes hung:\n" + "\n-----\n".join(dumps)) from None
    assert proc.returncode == returncode, out[-3000:]
    outs.append(out)
  return outs


def test_sigterm_on_one_process_stops_all_at_the_same_step(tmp_path):
  workdir = str(tmp_path / "run")
  first, second = _start_pair(workdir)
  deadline = time.monotonic() + TIMEOUT
  seen = []
  for line in first.stdout:  # Only process 0 prints progress.
    seen.append(line)
    if line.startswith("step  5/") or time.monotonic() > deadline:
      break
  second.send_signal(signal.SIGTERM)  # Only process 1 is "preempted".
  out0, out1 = _finish([first, second], returncode=75)  # Preempted: both exit 75.
  out0 = "".join(seen) + out0
  assert "Preemption (SIGTERM): saving a checkpoint at step" in out0, out0[-2000:]
  stopped = int(out0.split("saving a checkpoint at step ")[1].split(" ")[0])
  # The processes agree only at multiples of preemption_sync_every.
  assert stopped % SYNC_EVERY == 0 and 5 < stopped < TOTAL_STEPS
  assert "step " not in out1  # Process 1 stays quiet.
  assert str(stopped) in os.listdir(os.path.join(workdir, "checkpoints"))

  out0, _ = _finish(_start_pair(workdir))
  assert f"Resumed from the checkpoint at step {stopped}" in out0
  assert f"Done: {TOTAL_STEPS} steps" in out0 and "2 process(es)" in out0
  steps = [r["step"] for r in reporting.read_metrics(workdir) if r["kind"] == "train"]
  assert steps == list(range(5, TOTAL_STEPS + 1, 5))

  # The newest checkpoint damaged (every array data file cut): both processes agree it
  # cannot be restored, process 0 moves it aside, and both resume from the one before.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  finished = names.flatten(checkpoints.restore_params(os.path.join(workdir, "params")))
  previous = sorted(int(s) for s in os.listdir(ckpt_dir))[-2]
  for path in glob.glob(os.path.join(ckpt_dir, str(TOTAL_STEPS), "state", "**", "d", "*"),
                        recursive=True):
    os.truncate(path, os.path.getsize(path) // 2)
  out0, _ = _finish(_start_pair(workdir))
  assert f"The checkpoint at step {TOTAL_STEPS} cannot be restored (" in out0, out0[-3000:]
  assert f"Resuming from step {previous} instead." in out0
  assert f"Done: {TOTAL_STEPS} steps" in out0
  assert len(glob.glob(os.path.join(ckpt_dir, f"{TOTAL_STEPS}.damaged-*"))) == 1
  again = names.flatten(checkpoints.restore_params(os.path.join(workdir, "params")))
  for key, value in finished.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)
