"""Mixup and CutMix of a device batch, and label smoothing (jit-able, static shapes).

Conventions (timm's `Mixup` in its default 'batch' mode):
  - The partner of example i is example b-1-i (the batch flipped), so no permutation has
    to be drawn or communicated; with an odd batch the middle example mixes with itself.
  - One lam per batch. With probability `mix_prob` the batch is mixed, otherwise returned
    as it is (same values).
  - Mixup: lam ~ Beta(mixup_alpha, mixup_alpha); x = lam x + (1 - lam) x_partner.
  - CutMix: lam ~ Beta(cutmix_alpha, cutmix_alpha); a box of side fractions sqrt(1 - lam)
    centred at a uniform pixel, clipped to the image, is pasted from the partner; lam is
    then corrected to 1 - (pasted pixels) / (h w), the exact fraction kept.
  - Both on: per mixed batch, CutMix with probability `switch_prob`, else Mixup (timm's
    rule: the two alternate at random rather than by step parity, so the choice needs no
    step counter and is the same on every device).
  - targets = lam t + (1 - lam) t_partner, for soft targets that already carry label
    smoothing (`one_hot_smoothed`), so mixed targets still sum to 1.
"""

import jax
import jax.numpy as jnp


def one_hot_smoothed(labels, num_classes: int, smoothing: float = 0.0, dtype=jnp.float32):
  """int labels [b] -> targets [b, num_classes]: 1 - smoothing + smoothing / C on the label,
  smoothing / C elsewhere (the Inception/timm convention; rows sum to 1)."""
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f'Label smoothing must be in [0, 1), got {smoothing}.')
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=dtype) * (1.0 - smoothing) + off


def _check_alpha(name, alpha):
  if alpha < 0:
    raise ValueError(f'{name} must be >= 0 (0 = off), got {alpha}.')


def _mixup(rng, images, alpha):
  lam = jax.random.beta(rng, alpha, alpha)
  mixed = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * images[::-1]
  return mixed, lam


def cutmix_mask(rng, lam, height: int, width: int):
  """bool [height, width], True inside the box pasted from the partner.

  The box has sides int(h sqrt(1 - lam)) x int(w sqrt(1 - lam)) centred at a uniform
  pixel (cy, cx) and spans [cy - cut_h // 2, cy + cut_h // 2) clipped to the image (timm).
  """
  ky, kx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  in_rows = (rows >= cy - cut_h // 2) & (rows < cy + cut_h // 2)
  in_cols = (cols >= cx - cut_w // 2) & (cols < cx + cut_w // 2)
  return in_rows[:, None] & in_cols[None, :]


def _cutmix(rng, images, alpha):
  k_lam, k_box = jax.random.split(rng)
  lam = jax.random.beta(k_lam, alpha, alpha)
  height, width = images.shape[1:3]
  mask = cutmix_mask(k_box, lam, height, width)
  mixed = jnp.where(mask[None, :, :, None], images[::-1], images)
  kept = 1.0 - jnp.sum(mask, dtype=jnp.float32) / (height * width)
  return mixed, kept


def mix_batch(rng, images, targets, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              mix_prob: float = 1.0, switch_prob: float = 0.5):
  """Mixup / CutMix of images [b, h, w, c] and soft targets [b, classes] (see module doc).

  The alphas and probabilities are Python numbers (static under jit); with both alphas 0
  or mix_prob 0 the inputs are returned unchanged (the same arrays). Returns
  (images, targets) with their shapes and dtypes.
  """
  _check_alpha('mixup_alpha', mixup_alpha)
  _check_alpha('cutmix_alpha', cutmix_alpha)
  for name, p in (('mix_prob', mix_prob), ('switch_prob', switch_prob)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f'{name} must be in [0, 1], got {p}.')
  if images.ndim != 4 or targets.ndim != 2 or images.shape[0] != targets.shape[0]:
    raise ValueError(f'mix_batch expects images [b, h, w, c] and targets [b, classes], got '
                     f'{images.shape} and {targets.shape}.')
  if (mixup_alpha == 0 and cutmix_alpha == 0) or mix_prob == 0:
    return images, targets

  branches = [lambda k: (images, jnp.ones((), jnp.float32))]  # 0: not mixed
  if mixup_alpha > 0:
    branches.append(lambda k: _mixup(k, images, mixup_alpha))
  if cutmix_alpha > 0:
    branches.append(lambda k: _cutmix(k, images, cutmix_alpha))
  k_apply, k_switch, k_mix = jax.random.split(rng, 3)
  if len(branches) == 3:
    choice = jnp.where(jax.random.uniform(k_switch) < switch_prob, 2, 1)
  else:
    choice = jnp.ones((), jnp.int32)
  choice = jnp.where(jax.random.uniform(k_apply) < mix_prob, choice, 0)
  mixed, lam = jax.lax.switch(choice, branches, k_mix)
  lam = lam.astype(targets.dtype)
  return mixed, lam * targets + (1 - lam) * targets[::-1]
