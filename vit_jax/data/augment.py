"""Optional on-device batch augmentation (applied after normalize_images)."""

import jax
import jax.numpy as jnp


def mixup(rng, images, labels, alpha: float = 0.2):
  """Mixup (Zhang et al. 2018) of a batch with itself in reverse order.

  images: float [B, ...]; labels: one-hot or soft labels [B, C] (float).
  One mixing weight lam ~ Beta(alpha, alpha) per batch, folded to lam >= 0.5
  so each example stays the dominant one. Returns (images, labels, lam).
  alpha <= 0 disables it (lam = 1).
  """
  if alpha <= 0:
    return images, labels, jnp.ones((), images.dtype)
  lam = jax.random.beta(rng, alpha, alpha).astype(images.dtype)
  lam = jnp.maximum(lam, 1.0 - lam)
  mixed_images = lam * images + (1.0 - lam) * images[::-1]
  mixed_labels = lam * labels + (1.0 - lam) * labels[::-1]
  return mixed_images, mixed_labels, lam
