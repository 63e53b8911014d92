"""Resuming is exact: a `python -m vit_jax.main` run stopped by SIGTERM (preemption),
rerun, killed with SIGKILL after a checkpoint, and rerun again ends with parameters
bit-identical to an uninterrupted run (same seed, 8 CPU devices)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from trainer_fixtures import REPO, TINY_FLAGS, as_flags
from vit_jax import checkpoints
from vit_jax.training import reporting
from vit_jax.models import params as names

TOTAL_STEPS = 40
RUN_FLAGS = dict(TINY_FLAGS, total_steps=TOTAL_STEPS, log_every=2, eval_every=0,
                 checkpoint_every=10, batch_size=32)
TIMEOUT = 120


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  return env


def _start(workdir, cache_dir):
  env = _env()
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  command = [sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}",
             *as_flags(RUN_FLAGS)]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, returncode=0) -> str:
  out, _ = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == returncode, out[-3000:]
  return out


def _read_until(proc, predicate) -> str:
  """Reads the process's output line by line until `predicate(line)`; returns it all."""
  seen = []
  deadline = time.monotonic() + TIMEOUT
  for line in proc.stdout:
    seen.append(line)
    if predicate(line) or time.monotonic() > deadline:
      break
  return "".join(seen)


def _params(workdir):
  return checkpoints.restore_params(os.path.join(workdir, "params"))


def _assert_identical(a, b):
  flat_a, flat_b = names.flatten(a), names.flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def _resumed_step(out: str) -> int:
  return int(out.split("Resumed from the checkpoint at step ")[1].split(" ")[0])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent XLA compilation cache shared by the runs, so only the first compiles."""
  return str(tmp_path_factory.mktemp("xla_cache"))


def test_sigterm_then_sigkill_then_resume_is_bit_identical(tmp_path, cache_dir):
  reference_dir, workdir = str(tmp_path / "uninterrupted"), str(tmp_path / "interrupted")
  reference = _start(reference_dir, cache_dir)  # Runs alongside the interrupted chain.

  # 1. Preemption: SIGTERM mid-run saves a checkpoint at the current step and exits 75.
  proc = _start(workdir, cache_dir)
  _read_until(proc, lambda line: line.startswith("step  6/"))
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc, returncode=75)
  assert "Preemption (SIGTERM): saving a checkpoint at step" in out, out[-2000:]
  stopped = int(out.split("saving a checkpoint at step ")[1].split(" ")[0])
  assert 6 <= stopped < 20
  assert "Rerun the same command to resume" in out
  assert not os.path.exists(os.path.join(workdir, "params"))  # Not finished.

  # 2. The rerun resumes there; SIGKILL it once the step-20 checkpoint is complete.
  proc = _start(workdir, cache_dir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.monotonic() + TIMEOUT
  # A step directory gets its final name only once its save is complete.
  while "20" not in os.listdir(ckpt_dir):
    assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 20"
    time.sleep(0.02)
  proc.kill()
  out, _ = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == -signal.SIGKILL
  assert _resumed_step(out) == stopped

  # 3. The next rerun resumes from the newest complete checkpoint and finishes.
  out = _finish(_start(workdir, cache_dir))
  assert _resumed_step(out) in (20, 30)
  assert f"Done: {TOTAL_STEPS} steps" in out

  _finish(reference)
  final = _params(workdir)
  _assert_identical(final, _params(reference_dir))
  # Guard against a vacuous comparison: training did change the parameters.
  earliest = min(int(name) for name in os.listdir(ckpt_dir) if name.isdigit())
  assert earliest < TOTAL_STEPS
  early = checkpoints.restore_params(os.path.join(ckpt_dir, str(earliest)))
  assert not np.array_equal(early["head"]["kernel"], final["head"]["kernel"])
  # The metrics log holds each training step once, even though steps were redone.
  train_steps = [r["step"] for r in reporting.read_metrics(workdir) if r["kind"] == "train"]
  assert train_steps == list(range(2, TOTAL_STEPS + 1, 2))
