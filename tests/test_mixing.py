"""Mixup / CutMix on the device: label weights, exact pasted area, off = identity, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.training import mixing

B, H, W, C, CLASSES = 8, 12, 10, 3, 16


def _batch(seed=0, smoothing=0.1):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(B, H, W, C)), jnp.float32)
  labels = jnp.arange(B) % CLASSES  # distinct labels: lam can be read off the targets
  return images, mixing.one_hot_smoothed(labels, CLASSES, smoothing), labels


def test_one_hot_smoothed():
  t = mixing.one_hot_smoothed(jnp.array([2, 0]), 4, 0.2)
  np.testing.assert_allclose(t, [[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]], rtol=1e-6)
  np.testing.assert_array_equal(mixing.one_hot_smoothed(jnp.array([1]), 3), [[0, 1, 0]])
  with pytest.raises(ValueError, match=r'smoothing must be in \[0, 1\)'):
    mixing.one_hot_smoothed(jnp.array([1]), 3, 1.0)


@pytest.mark.parametrize('kwargs', [dict(mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0),
                                    dict(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0)])
def test_off_returns_the_inputs(kwargs):
  images, targets, _ = _batch()
  out_images, out_targets = mixing.mix_batch(jax.random.key(0), images, targets, **kwargs)
  assert out_images is images and out_targets is targets


def test_not_mixed_draw_is_bit_identical():
  images, targets, _ = _batch()
  mix = jax.jit(functools.partial(mixing.mix_batch, mixup_alpha=0.8, cutmix_alpha=1.0,
                                  mix_prob=1e-9))
  for seed in range(5):  # mix_prob tiny: the draw says "not mixed"
    out_images, out_targets = mix(jax.random.key(seed), images, targets)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_targets, targets)


def _lam_from_targets(targets, labels, smoothing=0.1):
  """targets[i, label_i] = lam (1 - s) + s / C for distinct labels."""
  on = targets[0, labels[0]]
  return float((on - smoothing / CLASSES) / (1 - smoothing))


@pytest.mark.parametrize('seed', range(4))
def test_mixup_equals_the_formula(seed):
  images, targets, labels = _batch(seed)
  out_images, out_targets = mixing.mix_batch(jax.random.key(seed), images, targets,
                                             mixup_alpha=0.8, cutmix_alpha=0.0)
  lam = _lam_from_targets(out_targets, labels)
  assert 0.0 < lam < 1.0
  x, t = np.asarray(images, np.float64), np.asarray(targets, np.float64)
  np.testing.assert_allclose(out_images, lam * x + (1 - lam) * x[::-1], atol=1e-5)
  np.testing.assert_allclose(out_targets, lam * t + (1 - lam) * t[::-1], atol=1e-6)
  np.testing.assert_allclose(np.sum(out_targets, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('seed', range(8))
def test_cutmix_label_weight_is_the_pasted_area_exactly(seed):
  images, targets, labels = _batch(seed)
  out_images, out_targets = mixing.mix_batch(jax.random.key(seed), images, targets,
                                             mixup_alpha=0.0, cutmix_alpha=1.0)
  x, out = np.asarray(images), np.asarray(out_images)
  pasted = np.all(out == x[::-1], axis=(0, 3)) & np.any(out != x, axis=(0, 3))
  kept = np.all(out == x, axis=(0, 3))
  assert np.all(pasted | kept)  # every pixel is wholly one image or the other
  # The pasted pixels form one axis-aligned box.
  rows, cols = np.nonzero(pasted.any(axis=1))[0], np.nonzero(pasted.any(axis=0))[0]
  if pasted.any():
    assert pasted.sum() == len(rows) * len(cols)
    assert np.all(pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
  lam = 1.0 - pasted.sum() / (H * W)
  t = np.asarray(targets, np.float64)
  np.testing.assert_allclose(out_targets, lam * t + (1 - lam) * t[::-1], atol=1e-6)
  np.testing.assert_allclose(np.sum(out_targets, axis=1), 1.0, rtol=1e-6)


def test_cutmix_mask_is_the_clipped_box():
  # lam = 0.75: sides int(12 * 0.5) = 6, int(10 * 0.5) = 5 -> half sizes 3 and 2.
  key = jax.random.key(3)
  mask = np.asarray(mixing.cutmix_mask(key, jnp.float32(0.75), H, W))
  ky, kx = jax.random.split(key)
  cy, cx = int(jax.random.randint(ky, (), 0, H)), int(jax.random.randint(kx, (), 0, W))
  expected = np.zeros((H, W), bool)
  expected[max(cy - 3, 0):cy + 3, max(cx - 2, 0):cx + 2] = True
  np.testing.assert_array_equal(mask, expected)


def test_both_on_uses_each_sometimes():
  images, targets, _ = _batch()
  mix = jax.jit(functools.partial(mixing.mix_batch, mixup_alpha=0.8, cutmix_alpha=1.0))
  kinds = set()
  for seed in range(16):
    out, _ = mix(jax.random.key(seed), images, targets)
    x, out = np.asarray(images), np.asarray(out)
    kept = np.all(out == x, axis=(0, 3))
    kinds.add('cutmix' if kept.any() else 'mixup')
  assert kinds == {'cutmix', 'mixup'}


def test_switch_prob_one_is_always_cutmix():
  images, targets, _ = _batch()
  mix = jax.jit(functools.partial(mixing.mix_batch, mixup_alpha=0.8, cutmix_alpha=1.0,
                                  mix_prob=1.0, switch_prob=1.0))
  for seed in range(4):
    out, _ = mix(jax.random.key(seed), images, targets)
    # CutMix leaves some pixel of every image untouched unless the box covers all.
    assert np.all(np.asarray(out) == np.asarray(images), axis=(0, 3)).any()


def test_bad_arguments():
  images, targets, _ = _batch()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='mixup_alpha must be >= 0'):
    mixing.mix_batch(key, images, targets, mixup_alpha=-1.0)
  with pytest.raises(ValueError, match=r'mix_prob must be in \[0, 1\]'):
    mixing.mix_batch(key, images, targets, mixup_alpha=0.2, mix_prob=2.0)
  with pytest.raises(ValueError, match=r'images \[b, h, w, c\] and targets \[b, classes\]'):
    mixing.mix_batch(key, images, targets[:, 0], mixup_alpha=0.2)


@pytest.mark.parametrize('alphas', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_jit_and_sharded_batch_equal_the_eager_result(alphas):
  images, targets, _ = _batch(5)
  mix = functools.partial(mixing.mix_batch, mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
  key = jax.random.key(11)
  eager = mix(key, images, targets)
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  assert mesh.size == 8
  sharded = NamedSharding(mesh, P('data'))
  out = jax.jit(mix, out_shardings=(sharded, sharded))(
      key, jax.device_put(images, sharded), jax.device_put(targets, sharded))
  assert out[0].sharding.spec == P('data')
  for a, b in zip(out, eager):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert a.dtype == b.dtype and a.shape == b.shape


def test_bfloat16_images_keep_their_dtype():
  images, targets, _ = _batch()
  out_images, out_targets = mixing.mix_batch(jax.random.key(1), images.astype(jnp.bfloat16),
                                             targets, mixup_alpha=0.5)
  assert out_images.dtype == jnp.bfloat16 and out_targets.dtype == jnp.float32
