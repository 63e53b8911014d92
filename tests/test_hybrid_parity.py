"""Hybrid ViTs against the reference transcription (tests/reference_vit.py) on the same weights.

The named hybrids keep their ResNet stages and transformer widths; the encoder is cut to
one block and the images to a 2x2 token grid so that the test stays fast. The reference
standardises conv kernels as (w - mean) / (std + 1e-5); timm's form (w - mean) /
sqrt(var + 1e-8) must differ measurably, or the test could not see a wrong formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference_vit import RefViT, ref_weight_standardize
from vit_jax import models
from vit_jax.models import resnet

# (name, image size giving a 2x2 grid).
HYBRIDS = [("R+ViT-Ti_16", 64), ("R26+ViT-S_32", 64), ("R50+ViT-B_16", 32)]


def _relative_error(got, want) -> float:
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _random_params(shapes, seed=1, scale=0.05):
  """Noise for every parameter (norm scales around 1), in numpy: no compile per shape."""
  rng = np.random.RandomState(seed)

  def value(path, leaf):
    centre = 1.0 if path[-1].key == "scale" else 0.0
    return centre + scale * rng.normal(size=leaf.shape)

  return jax.tree_util.tree_map_with_path(value, shapes)


def _setup(name, image_size, dtype=jnp.float32):
  config = models.get_config(name)
  config.num_layers = 1
  config.dtype = jnp.dtype(dtype).name
  reference = RefViT(num_classes=7, patch_size=config.patch_size,
                     hidden_size=config.hidden_size, mlp_dim=config.mlp_dim,
                     num_heads=config.num_heads, num_layers=1,
                     resnet_layers=config.resnet_layers)
  images = np.random.RandomState(0).uniform(-1, 1, (2, image_size, image_size, 3))
  images = jnp.asarray(images, jnp.float32)
  shapes = jax.eval_shape(reference.init, jax.random.key(0), images)["params"]
  params = _random_params(shapes)
  cast = lambda a: jnp.asarray(a, dtype)
  return config, reference, jax.tree.map(cast, params), cast(images)


def _logits_and_embedding(module, params, images):
  """Logits [batch, classes] and the patch embeddings [batch, rows, cols, dim]."""
  apply = jax.jit(lambda p, x: module.apply(
      {"params": p}, x, capture_intermediates=lambda m, _: m.name == "embedding"))
  logits, state = apply(params, images)
  return logits, state["intermediates"]["embedding"]["__call__"][0]


@pytest.mark.parametrize("name,image_size", HYBRIDS)
def test_hybrid_logits_equal_reference(name, image_size):
  config, reference, params, images = _setup(name, image_size)
  want, want_embedding = _logits_and_embedding(reference, params, images)
  errors = {}
  for ws_form in resnet.WS_FORMS:
    config.ws_form = ws_form
    got, embedding = _logits_and_embedding(models.from_config(config, 7), params, images)
    errors[ws_form] = _relative_error(got, want)
    if ws_form == "reference":
      # The ResNet and the embedding are bit-identical; the one transformer block rounds
      # differently (our fused q/k/v projection), which is all that reaches the logits.
      np.testing.assert_array_equal(embedding, want_embedding)
  print(f"{name} {image_size}px: max |logit| {float(jnp.abs(want).max()):.2f}, relative "
        f"error {errors['reference']:.2e}, timm's form {errors['timm']:.2e}")
  assert float(jnp.abs(want).max()) > 0.5  # Real logits, not zeros.
  assert errors["reference"] < 1e-6
  assert errors["timm"] > 1e-6  # The test sees a wrong standardisation.


def test_float32_residual_is_rounding():
  """In float64 the stem-only hybrid agrees to ~5e-8 (left: our float32 softmax and
  float32 logits), while timm's form stays ~8e-6 away."""
  with jax.enable_x64(True):
    config, reference, params, images = _setup("R+ViT-Ti_16", 64, jnp.float64)
    want, _ = _logits_and_embedding(reference, params, images)
    errors = {}
    for ws_form in resnet.WS_FORMS:
      config.ws_form = ws_form
      got, _ = _logits_and_embedding(models.from_config(config, 7), params, images)
      errors[ws_form] = _relative_error(got, want)
  print(f"R+ViT-Ti_16 float64: relative error {errors['reference']:.2e}, timm's form "
        f"{errors['timm']:.2e}")
  assert errors["reference"] < 2e-7
  assert errors["timm"] > 1e-6


def test_standardize_forms_against_numpy():
  kernel = np.random.RandomState(3).normal(0.1, 0.02, (3, 3, 4, 5)).astype(np.float32)
  w = kernel.astype(np.float64).reshape(-1, 5)
  centred = w - w.mean(axis=0)
  reference = centred / (centred.std(axis=0) + 1e-5)
  timm_form = centred / np.sqrt(centred.var(axis=0) + 1e-8)
  np.testing.assert_allclose(resnet.standardize(kernel).reshape(-1, 5), reference, atol=2e-6)
  np.testing.assert_allclose(ref_weight_standardize(kernel).reshape(-1, 5), reference,
                             atol=2e-6)
  np.testing.assert_allclose(resnet.standardize(kernel, "timm").reshape(-1, 5), timm_form,
                             atol=2e-6)
  # With std ~0.02 the forms differ by ~1e-5 / 0.02 = 5e-4 relative.
  assert 2e-4 < np.abs(reference / timm_form - 1).max() < 1e-3
  with pytest.raises(ValueError, match="Unknown ws_form 'bit'.*'reference'.*'timm'"):
    resnet.standardize(kernel, "bit")
  with pytest.raises(ValueError, match="Unknown ws_form"):
    models.create("R+ViT-Ti_16", num_classes=2, ws_form="bit").init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
