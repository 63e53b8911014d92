"""Mixup/CutMix, EMA, layer-wise lr decay and evaluators wired into the trainer (issue 14)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from trainer_fixtures import tiny_config
from vit_jax import checkpoints
from vit_jax import models
from vit_jax.data.images import normalize_images
from vit_jax.evaluate import analysis
from vit_jax.evaluate import fewshot
from vit_jax.models import params as names
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.training import config_check
from vit_jax.training import loop
from vit_jax.training import mixing
from vit_jax.training import optim
from vit_jax.training import reporting
from vit_jax.training import step as step_lib

from multiprocess_worker import NUM_CLASSES, abstract_state, create_state, fixed_batch
from multiprocess_worker import make_config, random_params, train_step


def _on_mesh(batch, mesh):
  return {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}


def _setup(config, seed=0):
  mesh = mesh_lib.make_mesh(config.mesh)
  model = models.from_config(config.model, NUM_CLASSES)
  params = random_params(abstract_state(config, model, mesh).params, seed)
  state, shardings = create_state(config, model, mesh, rng=0, init_params=params)
  return mesh, model, params, state, shardings


def _run(config, steps=2, batch=None):
  mesh, model, params, state, shardings = _setup(config)
  step_fn = train_step(config, model, mesh, shardings)
  batch = _on_mesh(batch or fixed_batch(32), mesh)
  history, metrics = [], []
  for _ in range(steps):
    state, m = step_fn(state, batch)
    history.append(jax.device_get(state.params))
    metrics.append(jax.device_get(m))
  return params, state, history, metrics


# ------------------------------------------------------------------------- Mixup / CutMix
def _reference_step(config, model, mesh, shardings):
  """The classification step as it was before mixing existed, written from the definition:
  softmax cross-entropy against (1 - s) one_hot + s / C, dropout from the step's key."""
  s = float(config.label_smoothing)

  def batch_loss(params, batch, rng):
    logits = model.apply({"params": params}, normalize_images(batch["image"]), train=True,
                         rngs={"dropout": rng})
    targets = jax.nn.one_hot(batch["label"], NUM_CLASSES) * (1.0 - s) + s / NUM_CLASSES
    return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)), {}

  return step_lib.make_train_step(batch_loss=batch_loss, tx=optim.make_optimizer(config),
                                  schedule=optim.make_schedule(config), accum_steps=1,
                                  mesh=mesh, state_shardings=shardings)


@pytest.mark.parametrize("off", [dict(), dict(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0)])
def test_mixing_off_is_bit_identical_to_the_plain_step(off):
  config = make_config(label_smoothing=0.1, **off)
  config.model.dropout_rate = 0.1  # The dropout key must be the step's key, unsplit.
  mesh, model, _, state, shardings = _setup(config)
  ref_state, _ = _setup(config)[3:]
  batch = _on_mesh(fixed_batch(32), mesh)
  ours, ref = train_step(config, model, mesh, shardings), _reference_step(
      config, model, mesh, shardings)
  for _ in range(2):
    state, m = ours(state, batch)
    ref_state, ref_m = ref(ref_state, batch)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                  jax.tree.leaves(jax.device_get(ref_state.params))):
    np.testing.assert_array_equal(a, b)
  assert float(m["loss"]) == float(ref_m["loss"])


@pytest.mark.parametrize("loss", ["softmax_xent", "sigmoid_xent"])
def test_mixed_loss_is_the_loss_of_the_mixed_batch(loss):
  """Mixup + CutMix with soft targets, both losses (sigmoid_xent is supported)."""
  config = make_config(loss=loss, label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0)
  assert config_check.problems(config) == []
  mesh, model, params, state, shardings = _setup(config)
  batch = fixed_batch(32)
  _, metrics = train_step(config, model, mesh, shardings)(state, _on_mesh(batch, mesh))

  key = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(0))[1], 0)  # step 0's key
  _, mix_key = jax.random.split(key)
  targets = mixing.one_hot_smoothed(batch["label"], NUM_CLASSES, 0.1)
  images, targets = mixing.mix_batch(mix_key, normalize_images(jnp.asarray(batch["image"])),
                                     targets, 0.8, 1.0, 1.0, 0.5)
  np.testing.assert_allclose(np.sum(targets, -1), 1.0, rtol=1e-6)
  assert not np.allclose(targets, mixing.one_hot_smoothed(batch["label"], NUM_CLASSES, 0.1))
  logits = model.apply({"params": params}, images, train=False)
  if loss == "softmax_xent":
    per_example = -np.sum(targets * jax.nn.log_softmax(logits), -1)
  else:
    p = jax.nn.sigmoid(logits)
    per_example = -np.sum(targets * np.log(p) + (1 - targets) * np.log(1 - p), -1)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(per_example), rtol=1e-5)


def test_bad_mixing_fields_are_named():
  lines = config_check.problems(make_config(mixup_alpha=-1.0, mix_prob=1.5))
  assert "config.mixup_alpha=-1.0 must be >= 0 (0 = off)." in lines
  assert "config.mix_prob=1.5 must be in [0, 1]." in lines


# ------------------------------------------------------------------------------------ EMA
@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_ema_after_k_steps_is_the_closed_form_through_the_real_step(decay):
  params0, state, history, _ = _run(make_config(ema_decay=decay), steps=3)
  k = len(history)
  ema = jax.device_get(state.ema_params)
  for path, got in names.flatten(ema).items():
    p = [names.flatten(params0)[path]] + [names.flatten(h)[path] for h in history]
    want = decay**k * p[0].astype(np.float64) + (1 - decay) * sum(
        decay**(k - i) * p[i].astype(np.float64) for i in range(1, k + 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=path)
    assert got.dtype == np.float32


def test_ema_off_keeps_the_state_tree_and_old_checkpoints_resume(tmp_path):
  config = make_config()
  mesh, model, _, state, _ = _setup(config)
  off = abstract_state(config, model, mesh)
  assert off.ema_params is None
  old_layout = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
                "rng": state.rng}  # The state's fields before EMA existed.
  assert len(jax.tree.leaves(off)) == len(jax.tree.leaves(old_layout))
  on = abstract_state(make_config(ema_decay=0.99), model, mesh)
  assert len(jax.tree.leaves(on)) == len(jax.tree.leaves(off)) + len(jax.tree.leaves(off.params))
  with checkpoints.TrainCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    ckpt.save(3, old_layout, force=True)
    restored, _ = ckpt.restore(off)
  for field, value in old_layout.items():
    for a, b in zip(jax.tree.leaves(getattr(restored, field)), jax.tree.leaves(value)):
      np.testing.assert_array_equal(a, b)
  assert restored.ema_params is None


def test_fsdp_shards_the_ema_like_the_params():
  config = make_config(ema_decay=0.99, fsdp=True, fsdp_min_size=256)
  _, _, _, state, shardings = _setup(config)
  assert jax.tree.leaves(shardings.ema_params) == jax.tree.leaves(shardings.params)
  specs = {k: v.sharding.spec for k, v in names.flatten(state.ema_params).items()}
  assert "data" in specs["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"]
  for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
    assert p.sharding == e.sharding


# ------------------------------------------------------------------------ layer-wise decay
@pytest.mark.parametrize("scan", [False, True])
def test_a_step_with_layer_decay_is_the_manually_scaled_update(scan):
  """AdamW on the 2-layer model, FSDP over 8 devices: update = multiplier x plain update."""
  overrides = dict(optimizer="adam", lr=0.1, weight_decay=0.1, fsdp=True, fsdp_min_size=256)
  plain = make_config(**overrides)
  decayed = make_config(layer_decay=0.5, **overrides)
  for c in (plain, decayed):
    c.model.scan = scan
  p0, _, (plain_new,), _ = _run(plain, steps=1)
  _, _, (decayed_new,), _ = _run(decayed, steps=1)
  # Depth: embeddings 0 -> 0.5^3, block i -> 0.5^(2 - i), encoder_norm and head -> 1.
  expected = {"embedding": 0.125, "cls": 0.125, "Transformer/posembed_input": 0.125,
              "Transformer/encoderblock_0": 0.25, "Transformer/encoderblock_1": 0.5,
              "Transformer/encoder_norm": 1.0, "head": 1.0}
  flat0, flat_plain, flat_decayed = (names.flatten(t) for t in (p0, plain_new, decayed_new))
  seen = set()
  for path in flat0:
    prefix = next(k for k in [*expected, "Transformer/encoderblock"] if path.startswith(k))
    seen.add(prefix)
    plain_update = flat_plain[path].astype(np.float64) - flat0[path]
    decayed_update = flat_decayed[path].astype(np.float64) - flat0[path]
    if prefix == "Transformer/encoderblock":  # scanned: [2, ...], rows 0.25 and 0.5
      scale = np.asarray([0.25, 0.5]).reshape((2,) + (1,) * (plain_update.ndim - 1))
    else:
      scale = expected[prefix]
    np.testing.assert_allclose(decayed_update, scale * plain_update, rtol=2e-4, atol=1e-7,
                               err_msg=path)
  assert ("Transformer/encoderblock" in seen) == scan


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_layer_decay_outside_0_1_is_refused_before_training(value):
  lines = config_check.problems(make_config(layer_decay=value))
  assert any("config.layer_decay must be in (0, 1]" in l for l in lines), lines


# -------------------------------------------------------------------------------- evaluators
@pytest.fixture(scope="module")
def fewshot_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("fewshot_run"))
  c = tiny_config(total_steps=10, eval_every=10, checkpoint_every=5, log_every=5,
                  ema_decay=0.8, best_metric="fewshot_digits/5shot")
  c.evals.fewshot_digits = common.fewshot_eval("digits", every=5, shots=(1, 5),
                                               regs=(1.0,), seeds=(0, 1))
  summary = loop.train_and_evaluate(c, workdir)
  return workdir, summary


def test_fewshot_evaluator_matches_evaluate_fewshot_on_the_checkpoint(fewshot_run):
  workdir, summary = fewshot_run
  evals = [r for r in reporting.read_metrics(workdir) if r["kind"] == "eval"
           and "fewshot_digits/5shot" in r]
  assert [r["step"] for r in evals] == [5, 10]
  assert {"fewshot_digits/1shot", "fewshot_digits/ema/1shot",
          "fewshot_digits/ema/5shot"} <= set(evals[-1])
  # Independently: the exported (raw) parameters, features as `analyze` computes them.
  config, model, params = analysis.load_workdir(workdir)
  train_x, train_y = analysis._images_and_labels(config, "train", 10_000)
  test_x, test_y = analysis._images_and_labels(config, "test", 10_000)
  assert len(train_y) == 1437 and len(test_y) == 360
  train_f = analysis.features(model, params, train_x)
  test_f = analysis.features(model, params, test_x)
  for shots in (1, 5):
    want = np.mean([fewshot.fewshot_accuracy(train_f, train_y, test_f, test_y, shots=shots,
                                             num_classes=10, reg=1.0, seed=s) for s in (0, 1)])
    assert evals[-1][f"fewshot_digits/{shots}shot"] == pytest.approx(want, abs=1e-9)
  best = max(evals, key=lambda r: r["fewshot_digits/5shot"])
  assert summary["best_metric"] == "fewshot_digits/5shot"
  assert (summary["best_accuracy"], summary["best_step"]) == (best["fewshot_digits/5shot"],
                                                               best["step"])
  main = [r for r in reporting.read_metrics(workdir) if r["kind"] == "eval" and "accuracy" in r]
  assert [r["step"] for r in main] == [10] and "ema/accuracy" in main[0]


def test_ridge_strength_is_chosen_on_held_out_train_examples():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 4)) * 3
  y_train, y_test = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 10)
  x_train = centers[y_train] + rng.normal(size=(60, 4))
  x_test = centers[y_test] + rng.normal(size=(30, 4))
  from vit_jax.training import evaluators
  got = evaluators.fewshot_results((x_train, y_train), (x_test, y_test), 3, (2, 5, 30),
                                   (1e-3, 1e3), (0, 1))
  assert set(got) == {2, 5}  # 30 shots: a class has only 20 examples.
  for k in (2, 5):
    val, test = [], []
    for reg in (1e-3, 1e3):
      v, t = [], []
      for s in (0, 1):
        idx = fewshot.sample_shots(y_train, k, s)
        rest = np.setdiff1d(np.arange(60), idx)
        probe = fewshot.fit_linear_probe(x_train[idx], y_train[idx], 3, reg)
        v.append(np.mean(probe.predict(x_train[rest]) == y_train[rest]))
        t.append(np.mean(probe.predict(x_test) == y_test))
      val.append(np.mean(v))
      test.append(np.mean(t))
    assert got[k] == pytest.approx(test[int(np.argmax(val))])


def test_evals_problems_are_named_before_training(tmp_path):
  c = tiny_config()
  c.evals.v2 = common.classification_eval("no_such_dataset_xyz", "test")
  c.evals.fs = common.fewshot_eval("digits,also_missing_xyz", shots=(0, 5))
  c.evals.odd = common.fewshot_eval("digits")
  c.evals.odd.kind = "linear"
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(c, str(tmp_path / "run"))
  message = str(e.value)
  assert "config.evals.v2: dataset 'no_such_dataset_xyz': Unknown dataset" in message
  assert "config.evals.fs: dataset 'also_missing_xyz'" in message
  assert "config.evals.fs.shots=(0, 5) must be positive counts" in message
  assert "config.evals.odd.kind='linear': choose one of ('classification', 'fewshot')" in message
  assert not os.path.exists(tmp_path / "run")  # Nothing written.


def test_unknown_best_metric_lists_the_reported_ones():
  c = tiny_config(best_metric="fewshot/10shot", ema_decay=0.9)
  c.evals.fs = common.fewshot_eval("digits", shots=(5,))
  lines = config_check.problems(c)
  assert len(lines) == 1 and "config.best_metric='fewshot/10shot' is not reported" in lines[0]
  for name in ("accuracy", "ema/accuracy", "fs/5shot", "fs/ema/5shot"):
    assert f"'{name}'" in lines[0]


# ------------------------------------------------------------------- resume and export
def test_resume_is_bit_identical_with_ema_and_exports_the_ema(tmp_path):
  c = tiny_config(total_steps=10, eval_every=0, checkpoint_every=5, log_every=5,
                  ema_decay=0.7, export_ema=True, mixup_alpha=0.5, keep_checkpoints=3)
  c.pp.randaugment = (2, 10)
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  loop.train_and_evaluate(c, whole)
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "10"))
  shutil.rmtree(os.path.join(resumed, "params"))
  loop.train_and_evaluate(c, resumed)

  mesh = mesh_lib.make_mesh(c.mesh)
  model = models.from_config(c.model, 10)
  abstract = abstract_state(c, model, mesh)
  states = []
  for workdir in (whole, resumed):
    with checkpoints.TrainCheckpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      assert ckpt.latest_step() == 10
      states.append(jax.device_get(ckpt.restore(abstract)[0]))
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(names.flatten(states[0].ema_params)["head/kernel"],
                         names.flatten(states[0].params)["head/kernel"])
  exported = checkpoints.restore_params(os.path.join(resumed, "params"))
  for path, value in names.flatten(exported).items():
    np.testing.assert_array_equal(value, names.flatten(states[0].ema_params)[path])
