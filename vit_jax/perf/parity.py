"""GPU check: attention implementations and bf16 agree with float32 XLA (logits, grad norm).

Run on a GPU machine: `python -m vit_jax.benchmark parity`.
Results of 2026-11-26 on an H200: benchmarks/2026-11-26-h200.md.
"""

import jax
import jax.numpy as jnp

from vit_jax import models

VARIANTS = [("float32", "xla"), ("float32", "dot_product"), ("bfloat16", "xla"),
            ("bfloat16", "dot_product"), ("bfloat16", "cudnn")]


def random_params(model, images):
  """Initial parameters with a random head, so that the logits carry the whole network."""
  params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
  head = params["head"]["kernel"]
  params["head"]["kernel"] = 0.02 * jax.random.normal(jax.random.PRNGKey(2), head.shape)
  return params


def logits_and_grad_norm(model, params, images):
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)

  def loss(p, x):
    return jnp.mean(model.apply({"params": p}, x, train=True).astype(jnp.float32) ** 2)

  grads = jax.jit(jax.grad(loss))(params, images)
  norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)))
  return logits.astype(jnp.float32), float(norm)


def run_parity(log=print):
  log("jax", jax.__version__, jax.devices())
  images = jax.random.uniform(jax.random.PRNGKey(1), (8, 224, 224, 3), minval=-1, maxval=1)
  params = reference = reference_norm = None
  for dtype, impl in VARIANTS:
    model = models.create("ViT-B_16", num_classes=1000, dtype=dtype, attention_impl=impl)
    params = random_params(model, images) if params is None else params
    logits, norm = logits_and_grad_norm(model, params, images)
    if reference is None:
      reference, reference_norm = logits, norm
    error = float(jnp.max(jnp.abs(logits - reference)))
    log(f"{dtype:9s} {impl:12s} max|logits - f32 xla| = {error:.2e} "
          f"(max|logits| {float(jnp.max(jnp.abs(reference))):.2e}) "
          f"grad norm {norm:.6e} (f32 xla {reference_norm:.6e})")
