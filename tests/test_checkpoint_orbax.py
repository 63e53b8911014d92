"""Orbax checkpoints: params and train states, across device layouts, crashes and damage."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import checkpoints, models
from vit_jax.checkpoints import CheckpointError, TrainCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: object
  rng: jax.Array


@pytest.fixture(scope="module")
def params():
  model = models.create("testing", num_classes=8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  return jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def _mesh(n):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


def _shard(tree, mesh):
  """Shards every leaf's first axis that divides by the mesh size; replicates the rest."""
  def put(x):
    n = mesh.devices.size
    spec = P("data") if x.ndim and x.shape[0] % n == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree.map(put, tree)


def _assert_equal(a, b):
  fa, fb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_params_round_trip_bit_exact(tmp_path, params):
  checkpoints.save_params(tmp_path / "p", params)
  restored = checkpoints.restore_params(tmp_path / "p")
  _assert_equal(params, restored)
  assert isinstance(jax.tree.leaves(restored)[0], np.ndarray)
  with pytest.raises(FileExistsError, match="force=True"):
    checkpoints.save_params(tmp_path / "p", params)


@pytest.mark.parametrize("save_devices,restore_devices", [(8, 1), (1, 8)])
def test_params_across_device_layouts(tmp_path, params, save_devices, restore_devices):
  saved = _shard(params, _mesh(save_devices))
  checkpoints.save_params(tmp_path / "p", saved)
  target_mesh = _mesh(restore_devices)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                        target, jax.tree.map(lambda x: x.sharding, _shard(params, target_mesh)))
  restored = checkpoints.restore_params(tmp_path / "p", target)
  _assert_equal(params, restored)
  emb = restored["embedding"]["kernel"]
  assert len(emb.sharding.device_set) == restore_devices


def _state(params, mesh):
  tx = optax.adam(1e-3)
  p = _shard(params, mesh)
  opt_state = tx.init(p)
  return State(step=jnp.asarray(7), params=p, opt_state=opt_state, rng=jax.random.PRNGKey(3))


def _abstract(state, mesh):
  """The state's shapes with shardings on `mesh` (as the trainer builds for a restore)."""
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
          mesh, P("data") if x.ndim and x.shape[0] % mesh.devices.size == 0 else P())), like)


@pytest.mark.parametrize("save_devices,restore_devices", [(8, 1), (1, 8)])
def test_train_state_and_data_state_across_layouts(tmp_path, params, save_devices,
                                                   restore_devices):
  state = _state(params, _mesh(save_devices))
  data_state = {"next_index": 1234, "worker": [0, 1]}
  with TrainCheckpointer(tmp_path / "ck", async_save=True) as ck:
    assert ck.save(7, state, data_state=data_state, metrics={"accuracy": 0.5})
    ck.wait()
    assert ck.latest_step() == 7
  ck = TrainCheckpointer(tmp_path / "ck")
  restored, data = ck.restore(_abstract(state, _mesh(restore_devices)))
  ck.close()
  assert data == data_state
  _assert_equal(state, restored)
  mu = restored.opt_state[0].mu["embedding"]["kernel"]
  assert len(mu.sharding.device_set) == restore_devices


def test_keeps_last_k_and_best(tmp_path, params):
  state = _state(params, _mesh(1))
  accuracies = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.4}
  with TrainCheckpointer(tmp_path / "ck", max_to_keep=2, async_save=False) as ck:
    for step, acc in accuracies.items():
      ck.save(step, state, metrics={"accuracy": acc, "loss": 1.0 - acc})
    assert ck.all_steps() == [2, 4, 5]
    assert ck.best_step() == 2
  with TrainCheckpointer(tmp_path / "by_loss", max_to_keep=1, best_metric="loss",
                         best_mode="min", async_save=False) as ck:
    for step, acc in accuracies.items():
      ck.save(step, state, metrics={"loss": 1.0 - acc} if step != 4 else None)
    assert ck.all_steps() == [2, 5] and ck.best_step() == 2
  with TrainCheckpointer(tmp_path / "no_best", max_to_keep=2, keep_best=False,
                         async_save=False) as ck:
    for step in (1, 2, 3):
      ck.save(step, state)
    assert ck.all_steps() == [2, 3]
    _, data = ck.restore(_abstract(state, _mesh(1)), step=2)
    assert data is None


def test_finetune_from_orbax_directory(tmp_path, params):
  """load_pretrained reads save_params directories (also scanned) and TrainCheckpointer ones."""
  checkpoints.save_params(tmp_path / "p", params)
  checkpoints.save_params(tmp_path / "scanned", {"params": models.unrolled_to_scan(params)})
  with TrainCheckpointer(tmp_path / "ck", async_save=False) as ck:
    ck.save(3, _state(params, _mesh(8)))
  init = jax.eval_shape(models.create("testing", num_classes=2).init, jax.random.key(0),
                        jnp.zeros((1, 16, 16, 3)))["params"]
  config = models.get_config("testing")
  for path in (tmp_path / "p", tmp_path / "scanned", tmp_path / "ck", tmp_path / "ck" / "3"):
    new = checkpoints.load_pretrained(path, init, config)
    np.testing.assert_array_equal(new["embedding"]["kernel"], params["embedding"]["kernel"])
    np.testing.assert_array_equal(new["head"]["kernel"], np.zeros((32, 2)))


# Orbax's failed reads leave TensorStore callbacks aimed at a closed asyncio loop; they
# surface as "Event loop is closed" when collected. Collect them inside the test.
_ORBAX_FAILURE_NOISE = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_FAILURE_NOISE
def test_damaged_orbax_directory_gives_clear_error(tmp_path, params):
  checkpoints.save_params(tmp_path / "p", params)
  data_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "p" / "d") for f in fs]
  assert data_files
  for f in data_files:
    with open(f, "r+b") as fh:
      fh.truncate(max(os.path.getsize(f) // 3, 1))
  with pytest.raises(CheckpointError, match="damaged or incomplete"):
    checkpoints.restore_params(tmp_path / "p")
  gc.collect()


@_ORBAX_FAILURE_NOISE
def test_damaged_train_checkpoint_gives_clear_error(tmp_path, params):
  state = _state(params, _mesh(1))
  with TrainCheckpointer(tmp_path / "ck", async_save=False) as ck:
    ck.save(1, state)
  for d, _, files in os.walk(tmp_path / "ck" / "1" / "state" / "d"):
    for f in files:
      with open(os.path.join(d, f), "wb") as fh:
        fh.write(b"garbage")
  with TrainCheckpointer(tmp_path / "ck") as ck:
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
      ck.restore(_abstract(state, _mesh(1)))
    with pytest.raises(FileNotFoundError, match="available: \\[1\\]"):
      ck.restore(_abstract(state, _mesh(1)), step=5)
  with TrainCheckpointer(tmp_path / "empty") as ck:
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
      ck.restore(_abstract(state, _mesh(1)))
  gc.collect()


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    import orbax.checkpoint as ocp
    from vit_jax.checkpoints import TrainCheckpointer

    directory = sys.argv[1]
    state = {"w": jnp.arange(1000.0), "step": jnp.asarray(0)}
    ck = TrainCheckpointer(directory, async_save=False)
    ck.save(1, state, data_state={"pos": 1})
    ck.wait()

    real_save = ocp.JsonCheckpointHandler._save_fn
    async def hanging_save(self, *args):  # Step 2's files are written; hang before commit.
      await real_save(self, *args)
      print("IN_SAVE", flush=True)
      time.sleep(600)
    ocp.JsonCheckpointHandler._save_fn = hanging_save
    ck.save(2, {"w": jnp.arange(1000.0) * 2, "step": jnp.asarray(2)}, data_state={"pos": 2})
    print("SAVE_RETURNED", flush=True)
""")


def test_killed_mid_save_keeps_last_good_checkpoint(tmp_path):
  directory = tmp_path / "ck"
  script = tmp_path / "writer.py"
  script.write_text(_KILLED_WRITER)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, str(script), str(directory)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  output = []
  try:
    deadline = time.time() + 90
    for line in proc.stdout:
      output.append(line)
      if "IN_SAVE" in line or time.time() > deadline:
        break
    assert any("IN_SAVE" in line for line in output), "".join(output)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert not any("SAVE_RETURNED" in line for line in output)
  leftovers = [p.name for p in directory.iterdir()]
  assert any(name.startswith("2") and name != "2" for name in leftovers), leftovers

  abstract = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
              "step": jax.ShapeDtypeStruct((), jnp.int32,
                                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  with TrainCheckpointer(directory, async_save=False) as ck:
    assert ck.latest_step() == 1
    state, data = ck.restore(abstract)
    np.testing.assert_array_equal(state["w"], np.arange(1000.0))
    assert data == {"pos": 1}
    ck.save(2, {"w": jnp.ones(1000), "step": jnp.asarray(2)}, data_state={"pos": 2})
    assert ck.latest_step() == 2
