"""FlexiViT PI-resize: tokens kept when patches grow, a checkpoint moved between patch sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from vit_jax import models
from vit_jax.models import params as names
from vit_jax.models import patch_resize as pr


def _tokens(patches, kernel):
  """patches [n, p, p, c], kernel [p, p, c, d] -> tokens [n, d] (the embedding conv)."""
  return np.einsum("nhwc,hwcd->nd", patches, kernel)


def _resize_patches(patches, size):
  """Each [p, p, c] patch by jax.image.resize: the reference for the patch resize."""
  out = jax.image.resize(jnp.asarray(patches, jnp.float32),
                         (patches.shape[0],) + size + (patches.shape[-1],), "bilinear")
  return np.asarray(out, np.float64)


def _relative(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("size,new_size", [(16, 24), (8, 16), (16, 8), (7, 5), (5, 7)])
def test_resize_matrices_equal_jax_image_resize(size, new_size):
  rng = np.random.RandomState(0)
  images = rng.normal(size=(size, size, 3))
  want = np.asarray(jax.image.resize(jnp.asarray(images, jnp.float32),
                                     (new_size, new_size, 3), "bilinear"))
  np.testing.assert_allclose(pr.resize_images(images, (new_size, new_size)), want, atol=1e-5)
  # Column i of B is the resized i-th basis image.
  resize = pr.patch_resize_matrix((size, size), (new_size, new_size))
  i = 2 * size + 3
  basis = np.zeros((size, size, 1))
  basis.reshape(-1)[i] = 1.0
  np.testing.assert_allclose(resize[:, i], _resize_patches(basis[None], (new_size,) * 2)
                             .reshape(-1), atol=1e-6)


@pytest.mark.parametrize("p,q,c,d", [(16, 24, 3, 5), (8, 16, 3, 4), (8, 12, 5, 2)])
def test_pinv_keeps_every_token_when_patches_grow(p, q, c, d):
  rng = np.random.RandomState(1)
  kernel = rng.normal(size=(p, p, c, d)).astype(np.float32)
  patches = rng.normal(size=(6, p, p, c))
  new_kernel = pr.resize_patch_kernel(kernel, (q, q))
  assert new_kernel.shape == (q, q, c, d) and new_kernel.dtype == np.float32
  want = _tokens(patches, kernel)
  got = _tokens(_resize_patches(patches, (q, q)), new_kernel)
  assert _relative(got, want) < 1e-5  # float32 kernel and resized patches.
  # The plain resize of the kernel is another kernel: tokens change by ~(q/p)^2.
  bilinear = pr.resize_patch_kernel(kernel, (q, q), "bilinear")
  assert bilinear.shape == (q, q, c, d)
  assert _relative(_tokens(_resize_patches(patches, (q, q)), bilinear), want) > 0.3


@pytest.mark.parametrize("p,q", [(16, 8), (24, 16), (16, 12)])
def test_pinv_keeps_tokens_only_approximately_when_patches_shrink(p, q):
  """Shrinking loses detail: tokens of random patches are lost (measured 74-100 % error),
  those of smooth patches (upsampled from 4x4) kept to 2-11 %."""
  rng = np.random.RandomState(2)
  kernel = rng.normal(size=(p, p, 3, 5))
  new_kernel = pr.resize_patch_kernel(kernel, (q, q))
  rough = rng.normal(size=(8, p, p, 3))
  smooth = _resize_patches(rng.normal(size=(8, 4, 4, 3)), (p, p))
  rough_error = _relative(_tokens(_resize_patches(rough, (q, q)), new_kernel),
                          _tokens(rough, kernel))
  smooth_error = _relative(_tokens(_resize_patches(smooth, (q, q)), new_kernel),
                           _tokens(smooth, kernel))
  print(f"{p}->{q}: token error random patches {rough_error:.2f}, smooth {smooth_error:.3f}")
  assert rough_error > 0.5
  assert smooth_error < 0.2
  # Still the least-squares best: B^T w' is the projection of w onto range(B^T).
  resize = pr.patch_resize_matrix((p, p), (q, q))
  flat = kernel.reshape(p * p, -1)
  projection = resize.T @ np.linalg.pinv(resize.T)
  np.testing.assert_allclose(resize.T @ new_kernel.reshape(q * q, -1), projection @ flat,
                             atol=1e-9)


def test_resize_patch_kernel_errors():
  kernel = np.zeros((4, 4, 3, 2))
  with pytest.raises(ValueError, match=r"\[patch_h, patch_w, in_channels, dim\].*\(4, 4, 3\)"):
    pr.resize_patch_kernel(kernel[..., 0], (8, 8))
  with pytest.raises(ValueError, match="Unknown patch-kernel resize method 'cubic'"):
    pr.resize_patch_kernel(kernel, (8, 8), method="cubic")
  with pytest.raises(ValueError, match="two positive integers"):
    pr.resize_patch_kernel(kernel, (8, 0))
  assert pr.resize_patch_kernel(kernel, 6).shape == (6, 6, 3, 2)


# ------------------------------------------------------------------------ whole checkpoints


def _model(patch, **overrides):
  return models.create("testing", num_classes=3, patch_size=patch, **overrides)


def _params(patch, image_size=32, seed=0, **overrides):
  """Random parameters of the tiny ViT, in numpy (shapes from eval_shape: no compile)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(_model(patch, **overrides).init, jax.random.key(0), images)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32),
                      shapes["params"])


def _shapes(tree):
  return {k: tuple(np.shape(v)) for k, v in flatten_dict(tree, sep="/").items()}


def test_checkpoint_moves_between_patch_sizes_and_runs():
  images = jnp.asarray(np.random.RandomState(3).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  params16 = _params(16)
  params8 = pr.change_patch_size(params16, 8, image_size=32)
  assert _shapes(params8) == _shapes(_params(8))  # 4x4 grid: pos_embedding [1, 17, 32].
  logits8 = jax.jit(_model(8).apply)({"params": params8}, images)
  assert logits8.shape == (2, 3) and np.isfinite(logits8).all()

  back = pr.change_patch_size(params8, 16, image_size=32)
  assert _shapes(back) == _shapes(params16)
  logits16 = jax.jit(_model(16).apply)({"params": back}, images)
  assert logits16.shape == (2, 3) and np.isfinite(logits16).all()

  # 16 -> 8 shrinks (least squares), so the round trip cannot give the original kernel
  # back: it lies in the 64-dim space of 8 -> 16 upsampled kernels. What holds exactly
  # is the 8 -> 16 leg: B^T w16 = w8, i.e. on 16-px patches upsampled from 8-px ones the
  # returned kernel gives the tokens of the patch-8 model.
  w16, w8 = back["embedding"]["kernel"], params8["embedding"]["kernel"]
  assert _relative(w16, params16["embedding"]["kernel"]) > 0.5
  up = pr.patch_resize_matrix((8, 8), (16, 16))
  np.testing.assert_allclose(up.T @ w16.reshape(256, -1), w8.reshape(64, -1), atol=1e-5)
  # The 2x2 -> 4x4 -> 2x2 'zoom' of the position embeddings samples the corners, which
  # zoom keeps: that part does come back.
  pe = lambda p: p["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(pe(back), pe(params16), atol=1e-6)
  # Everything else is passed through.
  np.testing.assert_array_equal(back["Transformer"]["encoder_norm"]["scale"],
                                params16["Transformer"]["encoder_norm"]["scale"])


def test_change_patch_size_on_flat_params_and_gap_models():
  flat = names.flatten(_params(16))
  out = pr.change_patch_size(flat, 8, image_size=32, method="bilinear", posemb_method="bilinear")
  assert out[pr.EMBEDDING_KEY].shape == (8, 8, 3, 32)
  assert out[pr.POSEMB_KEY].shape == (1, 17, 32)
  np.testing.assert_array_equal(out["cls"], flat["cls"])
  np.testing.assert_allclose(out[pr.EMBEDDING_KEY],
                             pr.resize_images(flat[pr.EMBEDDING_KEY], (8, 8)), atol=1e-6)
  params = _params(16, classifier="gap")
  moved = pr.change_patch_size(params, 8, image_size=32)  # No class-token row.
  assert moved["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, 32)


def test_impossible_patch_size_changes_are_refused():
  params = _params(16)
  with pytest.raises(ValueError, match="Image size 32 is not divisible by the new patch size 12"):
    pr.change_patch_size(params, 12, image_size=32)
  with pytest.raises(ValueError, match="not divisible by the old patch size 16"):
    pr.change_patch_size(params, 8, image_size=40)
  with pytest.raises(ValueError, match=r"5 rows.*4x4 grid \(image_size 64 / patch 16\) need 17") as error:
    pr.change_patch_size(params, 8, image_size=32 * 2)  # Wrong image size: 4x4 grid.
  assert "pass the image_size the checkpoint was trained at" in str(error.value)
  flat = names.flatten(params)
  flat[pr.POSEMB_KEY] = flat[pr.POSEMB_KEY][:, :4]  # 3 grid rows: not a square grid.
  with pytest.raises(ValueError, match="4 rows"):
    pr.change_patch_size(flat, 8, image_size=32)
  with pytest.raises(ValueError, match="positive integer"):
    pr.change_patch_size(params, 0, image_size=32)
  with pytest.raises(ValueError, match="No 'embedding/kernel'"):
    pr.change_patch_size({"head": params["head"]}, 8, image_size=32)
  hybrid = dict(params, conv_root={"kernel": np.zeros((7, 7, 3, 64))})
  with pytest.raises(ValueError, match="plain ViTs"):
    pr.change_patch_size(hybrid, 8, image_size=32)
