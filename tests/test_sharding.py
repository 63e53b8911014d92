"""Meshes, parameter shardings and multi-host set-up; sharded steps equal the 1-device step."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import models
from vit_jax.parallel import distributed, mesh as mesh_lib, shardings as shardings_lib

from multiprocess_worker import NUM_CLASSES, abstract_state, fixed_batch, flatten, make_config, random_params
from multiprocess_worker import run_steps

BLOCK = "Transformer/encoderblock_0/"


def _abstract_params(**model_overrides):
  config = make_config()
  config.model.update(model_overrides)
  model = models.from_config(config.model, NUM_CLASSES)
  mesh = mesh_lib.make_mesh([("data", -1)])
  return abstract_state(config, model, mesh).params


def _specs(params_shardings) -> dict:
  """{'a/b/kernel': PartitionSpec} of a tree of NamedShardings."""
  return {"/".join(k.key for k in path): s.spec
          for path, s in jax.tree_util.tree_leaves_with_path(params_shardings)}


# ----------------------------------------------------------------------------- meshes

def test_make_mesh_shapes_and_batch_axes():
  mesh = mesh_lib.make_mesh([("data", -1)])
  assert dict(mesh.shape) == {"data": 8}
  assert mesh_lib.batch_axes(mesh) == ("data",)
  mesh = mesh_lib.make_mesh([("data", 4), ("model", 2)])
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert mesh_lib.batch_axes(mesh) == ("data",)
  assert mesh_lib.num_batch_shards(mesh) == 4
  mesh = mesh_lib.make_mesh("replica:2,data:-1,model:2")
  assert dict(mesh.shape) == {"replica": 2, "data": 2, "model": 2}
  assert mesh_lib.batch_axes(mesh) == ("replica", "data")
  assert mesh_lib.num_batch_shards(mesh) == 4
  # Devices in process/id order along the data axis: each host holds a contiguous slice.
  mesh = mesh_lib.make_mesh([("data", -1)], devices=jax.devices()[:4])
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[:4]]


@pytest.mark.parametrize("spec, message", [
    ([("data", 3)], "needs 3 devices. There are 8 devices"),
    ([("data", 3), ("model", -1)], "3 does not divide 8"),
    ([("data", -1), ("model", -1)], "at most one -1"),
    ([("data", 0)], "sizes must be positive"),
    ([("data", 4), ("data", 2)], "unique axis names"),
    ([("model", 8)], "no axis for the batch"),
    ([("data",)], "expected a list of (axis_name, size) pairs"),
])
def test_make_mesh_errors(spec, message):
  with pytest.raises(ValueError) as e:
    mesh_lib.make_mesh(spec)
  assert message in str(e.value)
  assert "('data', -1)" in str(e.value)  # Every error shows an example spec.


# ------------------------------------------------------------------ parameter layouts

def test_tensor_parallel_specs():
  params = _abstract_params()
  mesh = mesh_lib.make_mesh([("data", 4), ("model", 2)])
  specs = _specs(shardings_lib.param_shardings(params, mesh, fsdp=False))
  attn = BLOCK + "MultiHeadDotProductAttention_0/"
  assert specs[BLOCK + "MlpBlock_0/Dense_0/kernel"] == P(None, "model")  # [32, 128] by columns
  assert specs[BLOCK + "MlpBlock_0/Dense_0/bias"] == P("model")
  assert specs[BLOCK + "MlpBlock_0/Dense_1/kernel"] == P("model", None)  # [128, 32] by rows
  assert specs[BLOCK + "MlpBlock_0/Dense_1/bias"] == P()
  for name in ("query", "key", "value"):
    assert specs[attn + name + "/kernel"] == P(None, "model", None)  # [32, heads, 16]
    assert specs[attn + name + "/bias"] == P("model", None)
  assert specs[attn + "out/kernel"] == P("model", None, None)  # [heads, 16, 32]
  assert specs[attn + "out/bias"] == P()
  for name in ("embedding/kernel", "head/kernel", "cls", BLOCK + "LayerNorm_0/scale",
               "Transformer/posembed_input/pos_embedding"):
    assert specs[name] == P(), name


def test_fsdp_specs_shard_largest_divisible_axis_of_big_params():
  params = _abstract_params()
  mesh = mesh_lib.make_mesh([("data", -1)])
  specs = _specs(shardings_lib.param_shardings(params, mesh, fsdp=True, fsdp_min_size=1024))
  assert specs[BLOCK + "MlpBlock_0/Dense_0/kernel"] == P(None, "data")  # [32, 128]: 128
  assert specs[BLOCK + "MlpBlock_0/Dense_1/kernel"] == P("data", None)  # [128, 32]: 128
  assert specs[BLOCK + "MultiHeadDotProductAttention_0/query/kernel"] == P("data", None, None)
  assert specs["Transformer/posembed_input/pos_embedding"] == P()  # 544 elements: small
  assert specs[BLOCK + "MlpBlock_0/Dense_0/bias"] == P()  # 128 elements: below the minimum
  # The default minimum (16384 elements) keeps every tiny-model parameter replicated.
  default = _specs(shardings_lib.param_shardings(params, mesh, fsdp=True))
  assert set(default.values()) == {P()}


def test_adam_moments_follow_their_parameters_layout():
  config = make_config(optimizer="adam", weight_decay=0.1, grad_clip_norm=1.0, fsdp=True,
                       fsdp_min_size=1024)
  model = models.from_config(config.model, NUM_CLASSES)
  abstract = abstract_state(config, model, mesh_lib.make_mesh(config.mesh))
  adam = abstract.opt_state[1][0]  # chain(clip, adamw); adamw = chain(scale_by_adam, ...)
  for moments in (adam.mu, adam.nu):
    kernel = moments["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "data") and kernel.dtype == np.float32
    assert moments["head"]["bias"].sharding.spec == P()
  assert adam.count.sharding.spec == P() and abstract.step.sharding.spec == P()
  assert abstract.rng.sharding.spec == P()


def test_fsdp_and_tensor_parallel_combine_and_scan_keeps_layer_axis():
  params = _abstract_params(scan=True)
  mesh = mesh_lib.make_mesh([("data", 4), ("model", 2)])
  specs = _specs(shardings_lib.param_shardings(params, mesh, fsdp=True, fsdp_min_size=1024))
  stacked = "Transformer/encoderblock/"
  # [layers=2, 32, 128]: columns over 'model', then the largest free axis (32) over 'data'.
  assert specs[stacked + "MlpBlock_0/Dense_0/kernel"] == P(None, "data", "model")
  assert specs[stacked + "MlpBlock_0/Dense_1/kernel"] == P(None, "model", "data")
  # [layers, heads, 16, 32]: heads over 'model', the 32 over 'data'.
  assert specs[stacked + "MultiHeadDotProductAttention_0/out/kernel"] == P(
      None, "model", None, "data")


@pytest.mark.parametrize("mesh_spec", [(("data", -1),), (("data", 4), ("model", 2))])
def test_fsdp_divides_vit_h_train_state_over_the_devices(mesh_spec):
  """ViT-H/14 (632M params, 1.9G with Adam's moments): each device holds about 1/8."""
  config = make_config(optimizer="adam", weight_decay=0.1, fsdp=True)
  config.model = models.get_config("ViT-H_14")
  config.model.scan = True
  config.pp.crop = 224
  model = models.from_config(config.model, 1000)
  abstract = abstract_state(config, model, mesh_lib.make_mesh(mesh_spec))
  total = per_device = 0
  for x in jax.tree_util.tree_leaves(abstract):
    total += int(np.prod(x.shape))
    per_device += int(np.prod(x.sharding.shard_shape(x.shape)))
  assert 1.89e9 < total < 1.90e9
  assert per_device < 1.01 * total / 8


def test_tensor_parallel_needs_divisible_heads():
  params = _abstract_params()  # 2 heads
  mesh = mesh_lib.make_mesh([("data", 2), ("model", 4)])
  with pytest.raises(ValueError, match=r"Attention_0/\w+/\w+ \(.*2, 16\) over the 'model' axis "
                                       r"of size 4: axis \d \(size 2\) is not divisible.*"
                                       r"divides num_heads"):
    shardings_lib.param_shardings(params, mesh, fsdp=False)


# ------------------------------------------------------------------------- multi-host

def test_distributed_init_kwargs():
  config = make_config()
  kwargs = distributed.distributed_init_kwargs
  assert kwargs(config, environ={}) is None  # Single process: nothing to do.
  slurm = {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "4", "SLURM_PROCID": "1",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "node[01-02]"}
  # The coordinator comes from the SLURM environment (vit_jax/parallel/slurm.py).
  assert kwargs(config, environ=slurm) == dict(
      coordinator_address="node01:61457", num_processes=4, process_id=1,
      cluster_detection_method="deactivate", local_device_ids=[1])
  assert kwargs(config, environ={"SLURM_JOB_ID": "17", "SLURM_NTASKS": "1"}) is None
  assert kwargs(config, environ={"OMPI_COMM_WORLD_SIZE": "2"}) == {}
  assert kwargs(config, environ={"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}
  assert kwargs(config, environ={"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  config.distributed.mode = "on"
  assert kwargs(config, environ={}) == {}
  config.distributed.mode = "off"
  assert kwargs(config, environ=slurm) is None
  config.distributed.mode = "auto"
  config.distributed.coordinator_address = "10.0.0.1:1234"
  config.distributed.num_processes = 2
  config.distributed.process_id = 1
  assert kwargs(config, environ={}) == dict(coordinator_address="10.0.0.1:1234",
                                            num_processes=2, process_id=1)


def test_distributed_config_errors():
  config = make_config()
  config.distributed.coordinator_address = "10.0.0.1:1234"
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    distributed.distributed_init_kwargs(config, environ={})
  config.distributed.num_processes, config.distributed.process_id = 2, 2
  with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, 2\)"):
    distributed.distributed_init_kwargs(config, environ={})
  config.distributed.mode = "sometimes"
  with pytest.raises(ValueError, match="Unknown config.distributed.mode 'sometimes'"):
    distributed.distributed_init_kwargs(config, environ={})


def test_initialize_distributed_single_process_is_a_no_op():
  distributed.initialize_distributed(make_config())
  assert jax.process_count() == 1 and not jax.distributed.is_initialized()


# ---------------------------------------------- sharded steps equal the 1-device step

STEPS = 2  # Step 2 is the first with momentum; both steps train every layer.


def _global_batch(config):
  batch = fixed_batch(config.batch_size)
  return lambda mesh: {k: jax.device_put(v, mesh_lib.batch_sharding(mesh))
                       for k, v in batch.items()}


@pytest.fixture(scope="module")
def single_device_run():
  config = make_config()
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  losses, state = run_steps(config, mesh, _global_batch(config), STEPS)
  return losses, flatten(jax.device_get(state.params))


def _assert_same_run(reference, losses, state):
  ref_losses, ref_params = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert ref_losses[1] < ref_losses[0] - 0.01 # The steps did change the model.
  params = flatten(jax.device_get(state.params))
  assert params.keys() == ref_params.keys()
  for name, value in params.items():
    np.testing.assert_allclose(value, ref_params[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_data_parallel_step_equals_single_device(single_device_run):
  config = make_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  losses, state = run_steps(config, mesh, _global_batch(config), STEPS)
  _assert_same_run(single_device_run, losses, state)
  kernel = state.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P() and len(kernel.sharding.device_set) == 8


def test_fsdp_step_equals_single_device(single_device_run):
  config = make_config(fsdp=True, fsdp_min_size=1024)
  mesh = mesh_lib.make_mesh(config.mesh)
  losses, state = run_steps(config, mesh, _global_batch(config), STEPS)
  _assert_same_run(single_device_run, losses, state)
  name = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"
  kernel = state.params["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P(None, "data"), name
  assert kernel.addressable_shards[0].data.shape == (32, 16)  # 128 columns / 8 devices
  # The momentum buffer of a sharded parameter is sharded the same way.
  trace = state.opt_state[0].trace  # optax.sgd with momentum: (TraceState, ...)
  momentum = trace["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert momentum.sharding.spec == P(None, "data")
  assert state.params["head"]["bias"].sharding.spec == P()


def test_tensor_parallel_step_equals_single_device(single_device_run):
  config = make_config(mesh=[("data", 4), ("model", 2)])
  mesh = mesh_lib.make_mesh(config.mesh)
  losses, state = run_steps(config, mesh, _global_batch(config), STEPS)
  _assert_same_run(single_device_run, losses, state)
  block = state.params["Transformer"]["encoderblock_0"]
  dense0 = block["MlpBlock_0"]["Dense_0"]["kernel"]
  assert dense0.sharding.spec == P(None, "model")
  assert dense0.addressable_shards[0].data.shape == (32, 64)
  query = block["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  assert query.sharding.spec == P(None, "model", None)
  assert query.addressable_shards[0].data.shape == (32, 1, 16)  # One head per device.
  assert block["MlpBlock_0"]["Dense_1"]["kernel"].sharding.spec == P("model", None)


def test_scanned_remat_fsdp_tensor_parallel_step_equals_single_device(single_device_run):
  """The L/H set-up (scan + remat + FSDP) with tensor parallelism on top."""
  config = make_config(mesh=[("data", 4), ("model", 2)], fsdp=True, fsdp_min_size=1024)
  config.model.scan, config.model.remat_policy = True, "nothing_saveable"
  mesh = mesh_lib.make_mesh(config.mesh)
  unrolled = random_params(_abstract_params())  # The reference run's params.
  losses, state = run_steps(config, mesh, _global_batch(config), STEPS,
                            params=models.unrolled_to_scan(unrolled))
  stacked = state.params["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert stacked.shape == (2, 32, 128)
  assert stacked.sharding.spec == P(None, "data", "model")
  assert stacked.addressable_shards[0].data.shape == (2, 8, 64)
  state = state.replace(params=models.scan_to_unrolled(state.params))
  _assert_same_run(single_device_run, losses, state)
