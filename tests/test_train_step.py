"""The train/eval steps, losses, schedules and optimizers on 8 emulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import checkpoints
from vit_jax import models
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.training import config_check
from vit_jax.training import optim
from vit_jax.training.objectives import classification

from multiprocess_worker import NUM_CLASSES, abstract_state, create_state, eval_step
from multiprocess_worker import fixed_batch, flatten, make_config, random_params, train_step


def _on_mesh(batch, mesh):
  return {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}


def _one_step(config, params, batch):
  """(metrics, new params) of one step from `params` on the config's mesh."""
  mesh = mesh_lib.make_mesh(config.mesh)
  model = models.from_config(config.model, NUM_CLASSES)
  state, shardings = create_state(config, model, mesh, rng=0, init_params=params)
  step_fn = train_step(config, model, mesh, shardings)
  state, metrics = step_fn(state, _on_mesh(batch, mesh))
  return jax.device_get(metrics), flatten(checkpoints.to_host(state.params))


@pytest.fixture(scope="module")
def setup():
  """Shared random params, a batch of 32 and the plain (accum_steps=1) step's results."""
  config = make_config()
  model = models.from_config(config.model, NUM_CLASSES)
  mesh = mesh_lib.make_mesh(config.mesh)
  params = random_params(abstract_state(config, model, mesh).params)
  batch = fixed_batch(32)
  metrics, new_params = _one_step(config, params, batch)
  return dict(params=params, batch=batch, metrics=metrics, new_params=new_params)


def test_step_metrics_match_direct_gradient(setup):
  """loss and grad_norm are the batch-mean loss and the global norm of its gradient."""
  model = models.from_config(make_config().model, NUM_CLASSES)
  images = setup["batch"]["image"].astype(np.float32) / 127.5 - 1.0
  labels = setup["batch"]["label"]

  def loss(p):
    logits = model.apply({"params": p}, images, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  value, grads = jax.jit(jax.value_and_grad(loss))(setup["params"])
  np.testing.assert_allclose(setup["metrics"]["loss"], value, rtol=1e-5)
  np.testing.assert_allclose(setup["metrics"]["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
  assert setup["metrics"]["learning_rate"] == pytest.approx(0.1)  # No warmup: full lr.
  # SGD's first step (momentum buffer empty): params - lr * grads.
  expected = flatten(jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, setup["params"],
                                            jax.device_get(grads)))
  for name, value in setup["new_params"].items():
    np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_gradient_accumulation_equals_full_batch_step(setup):
  metrics, params = _one_step(make_config(accum_steps=4), setup["params"], setup["batch"])
  for key in ("loss", "grad_norm", "learning_rate"):
    np.testing.assert_allclose(metrics[key], setup["metrics"][key], rtol=1e-5, err_msg=key)
  for name, value in params.items():
    np.testing.assert_allclose(value, setup["new_params"][name], rtol=1e-4, atol=1e-6,
                               err_msg=name)


def test_bfloat16_compute_keeps_float32_params(setup):
  config = make_config()
  config.model.dtype = "bfloat16"
  metrics, params = _one_step(config, setup["params"], setup["batch"])
  assert all(v.dtype == np.float32 for v in params.values())
  # Same step up to bfloat16 rounding (8 bits of mantissa).
  np.testing.assert_allclose(metrics["loss"], setup["metrics"]["loss"], rtol=2e-2)
  np.testing.assert_allclose(metrics["grad_norm"], setup["metrics"]["grad_norm"], rtol=5e-2)
  assert metrics["loss"] != setup["metrics"]["loss"]  # It really computed in bfloat16.


def test_loss_goes_down_from_fresh_init():
  """Adam with warmup and clipping, from the model's own init, memorises a fixed batch."""
  config = make_config(optimizer="adam", lr=3e-3, warmup_steps=2, total_steps=12,
                       schedule="linear", grad_clip_norm=1.0, weight_decay=0.1,
                       batch_size=16)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = models.from_config(config.model, NUM_CLASSES)
  state, shardings = create_state(config, model, mesh, rng=0)
  assert float(jnp.abs(state.params["head"]["kernel"]).max()) == 0.0  # The model's init.
  step_fn = train_step(config, model, mesh, shardings)
  batch = _on_mesh(fixed_batch(16), mesh)
  history, first_state = [], state
  for _ in range(12):
    state, metrics = step_fn(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  # The step donates its input state: the old buffers are reused, not kept alive.
  assert first_state.params["head"]["kernel"].is_deleted() and first_state.step.is_deleted()
  losses = [m["loss"] for m in history]
  assert losses[0] == pytest.approx(np.log(NUM_CLASSES), abs=1e-4)  # Zero head: uniform.
  # Step 0 has lr 0; then every step lowers the loss (2.30 -> 1.79 measured).
  assert all(b < a for a, b in zip(losses[1:], losses[2:])), losses
  assert losses[-1] < losses[0] - 0.4, losses
  assert [m["learning_rate"] for m in history[:4]] == pytest.approx(
      [0.0, 1.5e-3, 3e-3, 2.7e-3])  # Warmup to 3e-3 over 2 steps, then linear to 0 at 12.
  assert int(state.step) == 12


def test_eval_step_sums_over_unmasked_examples(setup):
  config = make_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  model = models.from_config(config.model, NUM_CLASSES)
  state, shardings = create_state(config, model, mesh, rng=0,
                                              init_params=setup["params"])
  eval_fn = eval_step(config, model, mesh, shardings)
  batch = dict(setup["batch"], mask=np.arange(32) < 27)  # The last 5 are padding.
  sums = jax.device_get(eval_fn(state.params, _on_mesh(batch, mesh)))

  images = batch["image"][:27].astype(np.float32) / 127.5 - 1.0
  logits = np.asarray(jax.jit(model.apply)({"params": setup["params"]}, images), np.float64)
  labels = batch["label"][:27]
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert sums["count"] == 27
  assert sums["correct"] == (logits.argmax(-1) == labels).sum()
  assert sums["correct_top5"] == (top5 == labels[:, None]).any(-1).sum()
  assert 0 < sums["correct"] < sums["correct_top5"] <= 27
  np.testing.assert_allclose(sums["loss_sum"], -log_probs[np.arange(27), labels].sum(),
                             rtol=1e-5)


# ------------------------------------------------------------------------------ losses

def test_softmax_loss_with_label_smoothing():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 2])
  loss_fn = classification.make_loss_fn("softmax_xent", 3, label_smoothing=0.3)
  log_p = np.asarray(jax.nn.log_softmax(logits))
  targets = np.full((2, 3), 0.1)
  targets[[0, 1], [0, 2]] = 0.8  # 0.7 + 0.3 / 3
  np.testing.assert_allclose(loss_fn(logits, labels), -(targets * log_p).sum(-1), rtol=1e-6)
  plain = classification.make_loss_fn("softmax_xent", 3)  # What evaluation uses.
  np.testing.assert_allclose(plain(logits, labels), -log_p[[0, 1], [0, 2]], rtol=1e-6)


def test_sigmoid_loss_sums_binary_cross_entropies():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  loss_fn = classification.make_loss_fn("sigmoid_xent", 3)
  sig = 1 / (1 + np.exp(-np.array([2.0, 0.0, -1.0])))
  expected = -(np.log(sig[1]) + np.log(1 - sig[0]) + np.log(1 - sig[2]))
  np.testing.assert_allclose(loss_fn(logits, jnp.array([1])), [expected], rtol=1e-6)


# ------------------------------------------------------------- schedules, optimizers

def test_cosine_schedule_with_warmup():
  schedule = optim.make_schedule(make_config(lr=0.03, warmup_steps=500, total_steps=10_500,
                                             schedule="cosine"))
  values = [float(schedule(s)) for s in (0, 250, 500, 5_500, 10_500)]
  np.testing.assert_allclose(values, [0.0, 0.015, 0.03, 0.015, 0.0], atol=1e-7)


def test_linear_schedule_with_warmup():
  schedule = optim.make_schedule(make_config(lr=1e-3, warmup_steps=10_000, total_steps=20_000,
                                             schedule="linear"))
  values = [float(schedule(s)) for s in (0, 5_000, 10_000, 15_000, 20_000)]
  np.testing.assert_allclose(values, [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def _params():
  return {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
          "norm": {"scale": jnp.ones((2,))}}


def test_adamw_decays_only_kernels():
  tx = optim.make_optimizer(make_config(optimizer="adam", lr=0.5, weight_decay=0.1,
                                        total_steps=10, grad_clip_norm=1.0))
  params = _params()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.05 * np.ones((2, 2)))  # lr * wd * w
  np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
  np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


def test_sgd_weight_decay_is_l2_on_kernels():
  tx = optim.make_optimizer(make_config(optimizer="sgd", lr=0.1, momentum=0.9,
                                        weight_decay=0.01, total_steps=10))
  params = _params()
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params),
                         params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -1e-3 * np.ones((2, 2)))
  np.testing.assert_allclose(updates["dense"]["bias"], 0.0)


def test_sgd_clips_at_global_norm():
  config = make_config(optimizer="sgd", lr=0.1, momentum=0.9, total_steps=10,
                       grad_clip_norm=1.0)
  tx = optim.make_optimizer(config)
  params = _params()
  grads = jax.tree_util.tree_map(lambda p: 10.0 * p, params)  # norm 10 * sqrt(8)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.1, rtol=1e-6)  # lr * clip norm
  tx = optim.make_optimizer(make_config(grad_clip_norm=None, total_steps=10))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.1 * 10 * np.sqrt(8), rtol=1e-6)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer="lamb"), "Unknown config.optimizer 'lamb'; choose one of ('sgd', 'adam')"),
    (dict(schedule="step"), "Unknown config.schedule 'step'; choose one of ('cosine', 'linear')"),
    (dict(loss="hinge"), "Unknown config.loss 'hinge'; choose one of ('softmax_xent', "),
    (dict(warmup_steps=200, total_steps=100), "warmup_steps=200 must be in [0, total_steps=100]"),
    (dict(batch_size=12), "config.batch_size=12 is not divisible by the 8 data-parallel devices "
                          "(mesh {'data': 8}). Use a multiple of 8, e.g. --config.batch_size=8 "
                          "or 16"),
    (dict(batch_size=32, accum_steps=3), "the 8 data-parallel devices x 3 accum_steps"),
    (dict(batch_size=32, accum_steps=0), "config.accum_steps must be >= 1"),
])
def test_config_check_rejects_bad_config(overrides, message):
  config = make_config(**overrides)
  mesh = mesh_lib.make_mesh(config.mesh)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check_config(config, mesh)
  assert message in str(e.value)


def test_config_check_lists_every_problem_at_once():
  config = make_config(optimizer="lamb", loss="hinge", batch_size=12, log_every=0)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check_config(config, mesh_lib.make_mesh(config.mesh))
  message = str(e.value)
  assert message.startswith("The config has 4 problems:")
  for field in ("config.optimizer", "config.loss", "config.batch_size=12", "config.log_every=0"):
    assert field in message, field


def test_batch_of_the_wrong_size_is_rejected(setup):
  config = make_config(batch_size=32, accum_steps=4)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = models.from_config(config.model, NUM_CLASSES)
  state, shardings = create_state(config, model, mesh, rng=0,
                                              init_params=setup["params"])
  step_fn = train_step(config, model, mesh, shardings)
  with pytest.raises(ValueError, match=r"The batch's size=16 is not divisible by the 8 "
                                       r"data-parallel devices x 4 accum_steps"):
    step_fn(state, _on_mesh(fixed_batch(16), mesh))


def test_init_params_that_do_not_fit_are_rejected(setup):
  config = make_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  model = models.from_config(config.model, NUM_CLASSES)
  params = jax.tree_util.tree_map(np.copy, setup["params"])
  params["head"]["kernel"] = np.zeros((32, 1000), np.float32)
  del params["cls"]
  params["extra"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    create_state(config, model, mesh, rng=0, init_params=params)
  assert "missing ['cls'] (1, 1, 32)" in str(e.value)
  assert "unexpected ['extra']" in str(e.value)
  assert "['head']['kernel']: got (32, 1000), model wants (32, 10)" in str(e.value)
