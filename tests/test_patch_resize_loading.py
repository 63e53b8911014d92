"""Patch-size changes on load: load_pretrained(patch_resize=...) and convert --patch-size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoints, convert, models
from vit_jax.checkpoints import CheckpointError


def _random_params(model, image_size, seed=0):
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) * 0.2
                                   for x in leaves])


def _init(model, image_size):
  return model.init(jax.random.key(1), jnp.zeros((1, image_size, image_size, 3)))["params"]


def _pinv_kernel_reference(kernel, new_patch):
  """w' with <resize(x), w'> = <x, w> (least norm), the resize taken from jax.image.resize
  of each one-hot p x p patch: an independent construction of FlexiViT's PI-resize."""
  p, _, c, d = kernel.shape
  basis = np.eye(p * p, dtype=np.float32).reshape(p * p, p, p)
  resized = jax.image.resize(jnp.asarray(basis), (p * p, new_patch, new_patch), "bilinear")
  b = np.asarray(resized, np.float64).reshape(p * p, -1)  # Row i: resized basis patch i.
  w = kernel.astype(np.float64).reshape(p * p, c * d)
  solution = np.linalg.lstsq(b, w, rcond=None)[0]  # b @ w' = w, least norm.
  return solution.reshape(new_patch, new_patch, c, d)


@pytest.fixture(scope="module")
def patch16(tmp_path_factory):
  """A 'testing'-size ViT with patch 16 at 64 px (a 4x4 grid), saved as .npz."""
  model = models.create("testing", num_classes=5, patch_size=16)
  params = _random_params(model, 64)
  path = tmp_path_factory.mktemp("ckpt") / "p16.npz"
  checkpoints.save_npz(path, params)
  return path, params


def test_patch_and_resolution_change_together(patch16):
  """Patch 16 at 64 px -> patch 12 at 60 px: the kernel PI-resized, the 4x4 grid resampled
  straight to 5x5 (64 px does not divide into 12 px patches, 60 px does)."""
  path, params = patch16
  config = models.get_config("testing")
  config.patch_size, config.image_size = 12, 60
  model = models.from_config(config, 3)
  new = checkpoints.load_pretrained(path, _init(model, 60), config, patch_resize="pinv")
  np.testing.assert_allclose(new["embedding"]["kernel"],
                             _pinv_kernel_reference(params["embedding"]["kernel"], 12),
                             rtol=1e-4, atol=1e-6)
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(new["Transformer"]["posembed_input"]["pos_embedding"],
                             models.resample_posemb(pe, (5, 5), 1), rtol=1e-6)
  assert model.apply({"params": new}, jnp.ones((1, 60, 60, 3))).shape == (1, 3)


@pytest.mark.parametrize("method", ["pinv", "bilinear"])
def test_patch16_checkpoint_loads_into_patch8_model_and_runs(patch16, method):
  path, params = patch16
  config = models.get_config("testing")
  config.patch_size, config.image_size = 8, 64
  model = models.from_config(config, 3)
  new = checkpoints.load_pretrained(path, _init(model, 64), config, patch_resize=method)
  kernel = np.asarray(new["embedding"]["kernel"])
  assert kernel.shape == (8, 8, 3, 32)
  if method == "pinv":
    np.testing.assert_allclose(kernel, _pinv_kernel_reference(params["embedding"]["kernel"], 8),
                               rtol=1e-4, atol=1e-6)
  else:
    want = jax.image.resize(params["embedding"]["kernel"], (8, 8, 3, 32), "bilinear")
    np.testing.assert_allclose(kernel, np.asarray(want), rtol=1e-4, atol=1e-6)
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]  # [1, 1 + 16, 32]
  np.testing.assert_allclose(new["Transformer"]["posembed_input"]["pos_embedding"],
                             models.resample_posemb(pe, (8, 8), 1), rtol=1e-6)
  np.testing.assert_array_equal(new["cls"], params["cls"])
  np.testing.assert_array_equal(new["head"]["kernel"], np.zeros((32, 3)))
  logits = model.apply({"params": new}, jnp.ones((2, 64, 64, 3)))
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_patch_change_errors(patch16):
  path, _ = patch16
  config = models.get_config("testing")
  config.patch_size, config.image_size = 8, 64
  init = _init(models.from_config(config, 3), 64)
  with pytest.raises(CheckpointError, match="patch_resize='pinv'"):
    checkpoints.load_pretrained(path, init, config)  # None: a mismatch, with the hint.
  with pytest.raises(CheckpointError, match="Unknown patch_resize"):
    checkpoints.load_pretrained(path, init, config, patch_resize="cubic")
  # A config for 64 px with 12 px patches (64 / 12 is not an integer grid); the
  # parameter shapes come from the nearest valid model (60 px).
  config.patch_size = 12
  model = models.from_config(config, 3)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 60, 60, 3), jnp.float32))["params"]
  with pytest.raises(CheckpointError, match="image size 64 is not divisible by 12"):
    checkpoints.load_pretrained(path, abstract, config, patch_resize="pinv")


def test_convert_patch_size(tmp_path, patch16, capsys):
  path, params = patch16
  out = tmp_path / "p8.npz"
  assert convert.main([str(path), str(out), "--patch-size", "8"]) == 0
  moved = checkpoints.load_npz(out)
  np.testing.assert_allclose(moved["embedding"]["kernel"],
                             _pinv_kernel_reference(params["embedding"]["kernel"], 8),
                             rtol=1e-4, atol=1e-6)
  assert moved["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 64, 32)
  model = models.create("testing", num_classes=5, patch_size=8)
  assert model.apply({"params": moved}, jnp.ones((1, 64, 64, 3))).shape == (1, 5)
  # 64 px does not divide into 12 px patches: exit 2 and a message saying so.
  assert convert.main([str(path), str(tmp_path / "bad.npz"), "--patch-size", "12"]) == 2
  assert "not divisible by the new patch size 12" in capsys.readouterr().err
  assert not (tmp_path / "bad.npz").exists()
