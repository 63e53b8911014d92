"""Masked patch prediction: colour targets, corruption, the model and its sharded step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoints
from vit_jax import models
from vit_jax.training import config_check
from vit_jax.training.objectives import mpp
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.models import masked_patch_predictor as mpp_model

from multiprocess_worker import create_state, flatten, make_config, train_step


def _shapes(tree) -> dict:
  return {k: v.shape for k, v in flatten(jax.tree_util.tree_map(np.asarray, tree)).items()}


# Jitted: one compile instead of one per op.
_corruption_masks = jax.jit(mpp_model.corruption_masks, static_argnums=(1, 2),
                            static_argnames=("rate", "mask_frac", "random_frac"))


def _init(model, images):
  return model.init({"params": jax.random.key(0)}, images, train=False)["params"]


def _random_images(batch=4, seed=0):
  rs = np.random.RandomState(seed)
  return jnp.asarray(rs.uniform(-1, 1, (batch, 16, 16, 3)), jnp.float32)


# --------------------------------------------------------------------- colour targets

def test_patch_color_targets_by_hand():
  image = np.zeros((8, 8, 3), np.float32)  # 2 x 2 patches of 4 x 4 pixels.
  image[:4, :4] = -1.0  # m = 0 everywhere -> class 0.
  image[:4, 4:] = [1.0, -1.0, 0.0]  # m = (1, 0, 0.5) -> q = (7, 0, 4).
  image[4:, :4, 0] = np.tile([-1.0, 1.0], 8).reshape(4, 4)  # Mean 0 -> m 0.5 -> 4.
  image[4:, :4, 1:] = [-0.4, 0.8]  # m = (0.3, 0.9) -> floor(2.4), floor(7.2) = 2, 7.
  image[4:, 4:] = [-0.5, 0.75, 0.74]  # m = (0.25, 0.875, 0.87): an edge goes up -> 2, 7, 6.
  targets = mpp_model.patch_color_targets(jnp.asarray(image[None]), patch_size=4)
  assert targets.dtype == jnp.int32
  np.testing.assert_array_equal(targets, [[0, 7 * 64 + 4, 4 * 64 + 2 * 8 + 7,
                                           2 * 64 + 7 * 8 + 6]])
  one_bit = mpp_model.patch_color_targets(jnp.asarray(image[None]), patch_size=4, bits=1)
  np.testing.assert_array_equal(one_bit, [[0, 4 + 1, 4 + 1, 2 + 1]])  # (r, g, b) bits.
  # Out-of-range values clip; row-major order matches the model's 16 tokens.
  many = mpp_model.patch_color_targets(_random_images() * 3, patch_size=4)
  assert many.shape == (4, 16) and 0 <= int(many.min()) and int(many.max()) < 512


# ------------------------------------------------------------------------ corruption

def test_corruption_counts_are_exact_and_split_80_10_10():
  c = _corruption_masks(jax.random.key(0), 2000, 16)
  corrupted, masked, replaced = (np.asarray(a) for a in c[:3])
  assert (corrupted.sum(1) == 8).all()  # Exactly half of every image.
  assert not (masked & replaced).any()
  assert not ((masked | replaced) & ~corrupted).any()
  total = corrupted.sum()
  assert masked.sum() / total == pytest.approx(0.8, abs=0.01)
  assert replaced.sum() / total == pytest.approx(0.1, abs=0.01)
  assert (corrupted & ~masked & ~replaced).sum() / total == pytest.approx(0.1, abs=0.01)
  source = np.asarray(c.source)
  assert (source != np.arange(2000 * 16).reshape(2000, 16)).all()  # Never itself.
  assert 0 <= source.min() and source.max() < 2000 * 16
  # Corrupted positions are uniform over the patches (each ~1/2 of the time).
  np.testing.assert_allclose(corrupted.mean(0), 0.5, atol=0.05)
  counts = [mpp_model.num_corrupted(n, r) for n, r in [(10, 0.3), (10, 0.25), (16, 1.0),
                                                       (4, 0.01)]]
  assert counts == [3, 3, 16, 1]  # 2.5 rounds up; at least one.
  quarter = _corruption_masks(jax.random.key(1), 3, 10, rate=0.25)
  np.testing.assert_array_equal(np.asarray(quarter.corrupted).sum(1), [3, 3, 3])


def test_corruption_is_deterministic_per_rng():
  a = _corruption_masks(jax.random.key(3), 4, 16)
  b = _corruption_masks(jax.random.key(3), 4, 16)
  c = _corruption_masks(jax.random.key(4), 4, 16)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.corrupted, c.corrupted)


def test_apply_corruption_masks_replaces_and_keeps():
  tokens = jax.random.normal(jax.random.key(0), (64, 16, 8))
  mask_token = jnp.full((1, 1, 8), 7.0)
  c = _corruption_masks(jax.random.key(1), 64, 16)
  out = np.asarray(mpp_model.apply_corruption(tokens, c, mask_token))
  tokens = np.asarray(tokens)
  masked, replaced = np.asarray(c.masked), np.asarray(c.replaced)
  untouched = ~masked & ~replaced
  assert masked.sum() > 300 and replaced.sum() > 20 and (untouched & c.corrupted).sum() > 20
  np.testing.assert_array_equal(out[untouched], tokens[untouched])
  np.testing.assert_array_equal(out[masked], 7.0)
  sources = tokens.reshape(-1, 8)[np.asarray(c.source)[replaced]]
  np.testing.assert_array_equal(out[replaced], sources)


# ----------------------------------------------------------------------------- model

def test_parameter_tree_holds_the_vit_unchanged_and_loads_for_finetuning(tmp_path):
  model = mpp_model.MaskedPatchPredictor(models.create("testing", num_classes=10))
  params = _init(model, _random_images(1))
  assert set(params) == {"vit", "mask_token", "mpp_head"}
  assert model.num_channels == 3 and model.num_classes == 512
  assert params["mask_token"].shape == (1, 1, 32)
  assert params["mpp_head"]["kernel"].shape == (32, 512)
  features = models.create("testing", num_classes=None)
  vit_params = _init(features, _random_images(1))
  assert _shapes(params["vit"]) == _shapes(vit_params)  # Names and shapes, 'cls' included.

  path = tmp_path / "mpp_encoder.npz"
  checkpoints.save_npz(path, params["vit"])
  classifier = models.create("testing", num_classes=10)
  init = _init(classifier, _random_images(1))
  loaded = flatten(checkpoints.load_pretrained(path, init, models.get_config("testing")))
  for name, value in flatten(params["vit"]).items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  np.testing.assert_array_equal(loaded["head/kernel"], 0.0)  # A fresh zero head.


def test_gap_encoder_has_no_class_token_and_outputs_per_patch():
  model = mpp_model.MaskedPatchPredictor(models.create("testing", num_classes=10,
                                                      classifier="gap"))
  params = _init(model, _random_images(2))
  assert "cls" not in params["vit"]
  out = model.apply({"params": params}, _random_images(2), train=True,
                    rngs={"mpp": jax.random.key(1)})
  assert out.logits.shape == (2, 16, 512) and out.targets.shape == (2, 16)
  np.testing.assert_array_equal(np.asarray(out.corrupted).sum(1), [8, 8])
  np.testing.assert_allclose(out.logits, 0.0)  # Zero-initialised head.


def test_corruption_reaches_the_encoder():
  """With every patch masked the output cannot depend on the image; without, it does."""
  model = mpp_model.MaskedPatchPredictor(models.create("testing", num_classes=10),
                                         rate=1.0, mask_frac=1.0, random_frac=0.0)
  a, b = _random_images(1, seed=1), _random_images(1, seed=2)
  params = _init(model, a)
  params["mpp_head"]["kernel"] = jax.random.normal(jax.random.key(1), (32, 512))
  rngs = {"mpp": jax.random.key(2)}

  def logits(images, **kwargs):
    return np.asarray(model.apply({"params": params}, images, rngs=rngs, **kwargs).logits)

  np.testing.assert_allclose(logits(a, train=True), logits(b, train=True), atol=1e-6)
  np.testing.assert_allclose(logits(a, corrupt=True), logits(b, corrupt=True), atol=1e-6)
  assert np.abs(logits(a) - logits(b)).max() > 1e-2  # train=False: nothing corrupted.
  out = model.apply({"params": params}, a, train=False)
  assert not np.asarray(out.corrupted).any()


def test_mpp_loss_counts_only_corrupted_patches():
  logits = jnp.zeros((1, 3, 4)).at[0, 0, 1].set(10.0).at[0, 2, 3].set(10.0)
  targets = jnp.array([[1, 0, 0]])
  output = mpp_model.MppOutput(logits, targets, jnp.array([[True, False, True]]))
  loss, accuracy = mpp.mpp_loss(output)
  log_p = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(loss, -(log_p[0, 0, 1] + log_p[0, 2, 0]) / 2, rtol=1e-6)
  assert float(accuracy) == 0.5


# ---------------------------------------------------------------------- train step

def _quadrant_batch(batch=16, seed=0) -> dict:
  """uint8 [batch, 16, 16, 3]: one random colour per 8 x 8 quadrant (2 x 2 patches), so a
  corrupted patch's colour can be read off its neighbours."""
  rs = np.random.RandomState(seed)
  colours = rs.randint(0, 256, (batch, 2, 2, 3)).astype(np.uint8)
  return {"image": colours.repeat(8, axis=1).repeat(8, axis=2)}


def _mpp_config():
  return make_config(optimizer="adam", lr=1e-2, warmup_steps=2, total_steps=30,
                     schedule="cosine", grad_clip_norm=1.0, batch_size=16, objective="mpp")


def _on_mesh(state, mesh):
  """A jitted MPP step for `mesh` and the batch there (state: a TrainState's layout)."""
  config = _mpp_config()
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step_fn = train_step(config, mpp.create_model(config), mesh, shardings)
  return step_fn, jax.device_put(_quadrant_batch()["image"], mesh_lib.batch_sharding(mesh))


def test_loss_goes_down_on_eight_devices_and_matches_one_device():
  mesh = mesh_lib.make_mesh([("data", -1)])
  assert mesh.devices.size == 8
  config = _mpp_config()
  state, _ = create_state(config, mpp.create_model(config), mesh, rng=0)
  initial = checkpoints.to_host(state)  # The step donates its input.
  step_fn, images = _on_mesh(state, mesh)
  history = []
  for _ in range(30):
    state, metrics = step_fn(state, {"image": images})
    history.append({k: float(v) for k, v in metrics.items()})
  losses = [m["loss"] for m in history]
  assert losses[0] == pytest.approx(np.log(512), abs=1e-4)  # Zero head: uniform.
  assert history[0]["accuracy"] < 0.05 and history[0]["learning_rate"] == 0.0
  assert history[1]["learning_rate"] == pytest.approx(5e-3)
  # 6.24 -> 3.4 measured: below log(64) = 4.16, the best guess from the batch's 64
  # quadrant colours alone, so the encoder reads the neighbours.
  assert np.mean(losses[-5:]) < 3.8, losses
  assert np.mean([m["accuracy"] for m in history[-5:]]) > 0.08, history[-5:]
  assert int(state.step) == 30

  # The same two steps on one device draw the same corruption and give the same numbers.
  one = mesh_lib.make_mesh([("data", -1)], devices=jax.devices()[:1])
  state = jax.device_put(initial, mesh_lib.replicated(one))
  step_fn, images = _on_mesh(state, one)
  for _ in range(2):
    state, metrics = step_fn(state, {"image": images})
  for key in ("loss", "accuracy", "grad_norm", "learning_rate"):
    np.testing.assert_allclose(float(metrics[key]), history[1][key], rtol=1e-4, err_msg=key)


# ------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(rate=0.0), r"corruption rate must be in \(0, 1\], got 0.0"),
    (dict(rate=1.5), r"corruption rate must be in \(0, 1\], got 1.5"),
    (dict(mask_frac=0.95, random_frac=0.1), "must be >= 0 and sum to at most 1"),
    (dict(random_frac=-0.1), "must be >= 0 and sum to at most 1"),
])
def test_bad_corruption_settings_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    mpp_model.corruption_masks(jax.random.key(0), 2, 16, **kwargs)
  model = mpp_model.MaskedPatchPredictor(models.create("testing", num_classes=10), **kwargs)
  with pytest.raises(ValueError, match=message):
    model.init({"params": jax.random.key(0)}, _random_images(1))


def test_bad_inputs_and_configs_are_rejected():
  model = mpp_model.MaskedPatchPredictor(models.create("testing", num_classes=10))
  with pytest.raises(ValueError, match="18x18 is not divisible by the patch size 4"):
    model.init({"params": jax.random.key(0)}, jnp.zeros((1, 18, 18, 3)))
  with pytest.raises(ValueError, match=r"Expected NHWC images"):
    mpp_model.patch_color_targets(jnp.zeros((16, 16, 3)), 4)
  with pytest.raises(ValueError, match="bits must be >= 1"):
    mpp_model.patch_color_targets(jnp.zeros((1, 16, 16, 3)), 4, bits=0)
  with pytest.raises(ValueError, match=r"Unknown config.mpp field\(s\) \['ratio'\]"):
    config = make_config()
    config.mpp.ratio = 0.5  # A field that config.mpp does not have.
    mpp.create_model(config)
  config = make_config(accum_steps=2, objective="mpp")
  with pytest.raises(config_check.ConfigError, match="no gradient accumulation"):
    config_check.check_config(config)


# ------------------------------------------------------------------ through the trainer


def _tiny_mpp_config(**overrides):
  """configs/mpp_digits.py shrunk like the trainer tests' tiny classification config."""
  from trainer_fixtures import load_config_file, shrink
  return shrink(load_config_file("mpp_digits"), **{
      **dict(total_steps=60, eval_every=30, checkpoint_every=30, log_every=30), **overrides})


def test_trainer_runs_mpp_and_exports_an_encoder_that_fine_tunes(tmp_path):
  from trainer_fixtures import tiny_config
  from vit_jax import checkpoints
  from vit_jax.training import loop, reporting
  workdir = str(tmp_path / "mpp")
  summary = loop.train_and_evaluate(_tiny_mpp_config(), workdir)
  records = reporting.read_metrics(workdir)
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert losses[0] < np.log(512) and losses[-1] < 0.6 * losses[0], losses
  evals = [r for r in records if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [30, 60]
  # 360 test digits x 8 of their 16 patches corrupted, padding masked.
  assert evals[-1]["num_examples"] == 360 * 8
  assert summary["accuracy"] > 1 / 8  # Above chance among the 8 grey colours.
  encoder = checkpoints.restore_params(summary["params_dir"])
  assert "embedding" in encoder and "mask_token" not in encoder and "head" not in encoder
  tuned = loop.train_and_evaluate(
      tiny_config(init_from=workdir, total_steps=60, eval_every=60, checkpoint_every=60,
                  plots=False), str(tmp_path / "tuned"))
  tuned_params = checkpoints.restore_params(tuned["params_dir"])
  np.testing.assert_array_equal(tuned_params["head"]["kernel"].shape, (32, 10))
  # Learning from the pre-trained encoder: above chance (0.1) and below ln(10) in loss.
  assert tuned["accuracy"] > 0.15 and tuned["eval_loss"] < np.log(10) - 0.1, tuned


def test_trainer_refuses_mpp_from_a_checkpoint(tmp_path):
  from vit_jax.training import loop
  with pytest.raises(ValueError, match="pre-trains from scratch"):
    loop.train_and_evaluate(_tiny_mpp_config(init_from=str(tmp_path)), str(tmp_path / "w"))
