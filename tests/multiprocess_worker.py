"""Tiny train-step setups shared by the tests, and the worker that test_multiprocess starts.

As a script: one process of a multi-process CPU job. It joins the job through
`parallel.distributed.initialize_distributed`, builds a mesh over all processes' devices, feeds only
its own rows of the global batch, runs `--steps` train steps and writes the losses and
the final (gathered) params to `--out/process_{id}.npz`.

  python tests/multiprocess_worker.py --process_id=0 --num_processes=2 --port=12345 \
      --out=/tmp/mp --steps=3 --mesh=data:2,model:2
The caller sets JAX_PLATFORMS=cpu and the per-process device count in the environment.
"""

import argparse
import os

import ml_collections
import numpy as np

NUM_CLASSES = 10
IMAGE_SIZE = 16


def make_config(**overrides) -> ml_collections.ConfigDict:
  """configs/common.py for the tiny 'testing' model: SGD, no warmup, no clipping."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  c = common.get_config()
  c.model = models.get_config("testing")
  c.pp.crop = IMAGE_SIZE
  c.update(dict(
      batch_size=32, eval_batch_size=32, total_steps=100, warmup_steps=0, optimizer="sgd",
      lr=0.1, momentum=0.9, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip_norm=0.0,
      schedule="cosine", loss="softmax_xent", label_smoothing=0.0, accum_steps=1,
      mesh=(("data", -1),), fsdp=False, fsdp_min_size=2**14))
  c.update(overrides)
  return c


def abstract_state(config, model, mesh):
  """The abstract TrainState of `config` for `model`, as the trainer lays it out."""
  from vit_jax.training import optim, state  # pylint: disable=g-import-not-at-top
  return state.abstract_train_state(model, optim.make_optimizer(config), mesh,
                                    **state.layout_options(config))


def create_state(config, model, mesh, *, rng=0, init_params=None):
  """(state, shardings) of `config` for `model`, as the trainer creates them."""
  from vit_jax.training import optim, state  # pylint: disable=g-import-not-at-top
  return state.create_train_state(model, optim.make_optimizer(config), mesh, rng=rng,
                                  init_params=init_params, **state.layout_options(config))


def train_step(config, model, mesh, shardings):
  """The trainer's jitted step for `config.objective`."""
  from vit_jax.training import objectives  # pylint: disable=g-import-not-at-top
  return objectives.make_train_step(objectives.get(config), config, model, mesh, shardings)


def eval_step(config, model, mesh, shardings):
  """The trainer's jitted eval step for `config.objective`."""
  from vit_jax.training import objectives  # pylint: disable=g-import-not-at-top
  return objectives.make_eval_step(objectives.get(config), config, model, mesh, shardings)


def random_params(abstract_params, seed: int = 0):
  """Normal(0, 0.1) numpy params for the given shapes (a non-zero head, unlike init).

  Cheaper than compiling the model's init, and every layer gets gradients on step 1.
  """
  import jax  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda a: (0.1 * rs.standard_normal(a.shape)).astype(np.float32), abstract_params)


def fixed_batch(batch_size: int, seed: int = 0) -> dict:
  """{'image': uint8 [batch, 16, 16, 3], 'label': int32 [batch]} from a fixed seed."""
  rs = np.random.RandomState(seed)
  return {"image": rs.randint(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
          "label": rs.randint(0, NUM_CLASSES, (batch_size,)).astype(np.int32)}


def flatten(tree) -> dict:
  """{'a/b/c': np.ndarray} of a nested dict of arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  return {"/".join(str(k.key) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def run_steps(config, mesh, local_batch_fn, steps: int, params=None):
  """Runs `steps` train steps from `params` (default `random_params`); (losses, state).

  local_batch_fn(mesh) -> the batch as global jax.Arrays on `mesh`.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  model = models.from_config(config.model, NUM_CLASSES)
  if params is None:
    params = random_params(abstract_state(config, model, mesh).params)
  state, shardings = create_state(config, model, mesh, init_params=params)
  step_fn = train_step(config, model, mesh, shardings)
  batch = local_batch_fn(mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state


def _parse_mesh(text: str):
  """'data:2,model:2' -> [('data', 2), ('model', 2)]."""
  return [(name, int(size)) for name, size in (item.split(":") for item in text.split(","))]


def _worker(args):
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from vit_jax.parallel import distributed, mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  config = make_config(fsdp=True, fsdp_min_size=1024, mesh=_parse_mesh(args.mesh))
  config.distributed.coordinator_address = f"127.0.0.1:{args.port}"
  config.distributed.num_processes = args.num_processes
  config.distributed.process_id = args.process_id
  distributed.initialize_distributed(config)
  assert jax.process_count() == args.num_processes, jax.process_count()

  def local_batch(mesh):
    # Each process reads only its own contiguous rows of the global batch.
    full = fixed_batch(config.batch_size)
    rows = config.batch_size // jax.process_count()
    start = jax.process_index() * rows
    spec = mesh_lib.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(spec, v[start:start + rows])
            for k, v in full.items()}

  mesh = mesh_lib.make_mesh(config.mesh)
  losses, state = run_steps(config, mesh, local_batch, args.steps)
  params = checkpoints.to_host(state.params)
  dense0 = state.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  np.savez(os.path.join(args.out, f"process_{args.process_id}.npz"),
           losses=np.asarray(losses), global_devices=jax.device_count(),
           local_devices=jax.local_device_count(),
           dense0_spec=str(dense0.sharding.spec),
           **{"param/" + k: v for k, v in flatten(params).items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--mesh", default="data:-1")
  _worker(parser.parse_args())
