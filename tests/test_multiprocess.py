"""Two real JAX processes on localhost (2 CPU devices each) train like one process.

Each worker (tests/multiprocess_worker.py) joins through `jax.distributed.initialize`
with gloo CPU collectives, builds a 4-device mesh (FSDP, or FSDP x tensor parallel),
feeds only its half of the global batch with `make_array_from_process_local_data` and
writes its losses and gathered params, which must equal a single-device run's.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax.parallel import mesh as mesh_lib

from multiprocess_worker import fixed_batch, flatten, make_config, run_steps

STEPS = 3
TIMEOUT_S = 120  # A hung collective must fail the test, not hang CI.
WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env() -> dict:
  """This environment with 2 CPU devices per process instead of the conftest's 8."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=2"])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def _start_workers(out_dir, mesh, num_processes=2):
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, WORKER, f"--process_id={i}", f"--num_processes={num_processes}",
       f"--port={port}", f"--out={out_dir}", f"--steps={STEPS}", f"--mesh={mesh}"],
      env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(num_processes)]


def _wait(procs) -> list[str]:
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"Multi-process workers did not finish within {TIMEOUT_S} s: "
                + "\n".join(p.communicate()[0][-3000:] for p in procs))
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"worker {i} failed (rc {p.returncode}):\n{out[-5000:]}"
  return outputs


def _single_process_reference():
  """The same steps on one device of this process, from the same params and batch."""
  config = make_config(fsdp=True, fsdp_min_size=1024)
  batch = fixed_batch(config.batch_size)
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  place = lambda m: {k: jax.device_put(v, mesh_lib.batch_sharding(m)) for k, v in batch.items()}
  losses, state = run_steps(config, mesh, place, STEPS)
  return losses, flatten(jax.device_get(state.params))


# (mesh, the MLP's Dense_0 kernel [32, 128] layout): FSDP over 4 devices on 2 hosts, and
# 2-way FSDP x 2-way tensor parallel with the 'data' axis crossing the hosts.
LAYOUTS = [("data:-1", P(None, "data")), ("data:2,model:2", P("data", "model"))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mesh, dense0_spec", LAYOUTS)
def test_two_processes_train_like_one(tmp_path, mesh, dense0_spec):
  procs = _start_workers(str(tmp_path), mesh)
  try:
    ref_losses, ref_params = _single_process_reference()  # Runs while the workers do.
  finally:
    _wait(procs)
  assert ref_losses[-1] < ref_losses[0] - 0.01, ref_losses

  results = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(2)]
  for i, result in enumerate(results):
    assert int(result["global_devices"]) == 4 and int(result["local_devices"]) == 2
    # The MLP kernel really is split across both processes' devices.
    assert str(result["dense0_spec"]) == str(dense0_spec)
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5, err_msg=f"process {i}")
    params = {k[len("param/"):]: v for k, v in result.items() if k.startswith("param/")}
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
      np.testing.assert_allclose(value, ref_params[name], rtol=1e-4, atol=1e-5,
                                 err_msg=f"process {i}: {name}")
  for name in ref_params:  # Both processes hold the very same model.
    np.testing.assert_array_equal(results[0]["param/" + name], results[1]["param/" + name])
