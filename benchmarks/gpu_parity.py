"""GPU check: attention implementations and bf16 agree with float32 XLA (logits, grad norm).

Run from the repository root: PYTHONPATH=. python benchmarks/gpu_parity.py
"""
import jax, jax.numpy as jnp, numpy as np
from vit_jax import models
print("jax", jax.__version__, jax.devices())
x = jax.random.uniform(jax.random.PRNGKey(1), (8, 224, 224, 3), minval=-1, maxval=1)
ref = None
for dtype in ("float32", "bfloat16"):
  for impl in ("xla", "dot_product", "cudnn"):
    if dtype == "float32" and impl == "cudnn":
      continue
    m = models.create("ViT-B_16", num_classes=1000, dtype=dtype, attention_impl=impl,
                      head_bias_init=0.0)
    if ref is None:
      params = m.init(jax.random.PRNGKey(0), x[:1])["params"]
      # A non-zero head so that logits carry the whole network's output.
      params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape) * 0.02
    out = jax.jit(lambda p, x: m.apply({"params": p}, x))(params, x).astype(jnp.float32)
    g = jax.jit(jax.grad(lambda p, x: jnp.mean(m.apply({"params": p}, x, train=True).astype(jnp.float32) ** 2)))(params, x)
    gn = float(jnp.sqrt(sum(jnp.sum(l.astype(jnp.float32) ** 2) for l in jax.tree_util.tree_leaves(g))))
    if ref is None:
      ref, ref_gn = out, gn
    err = float(jnp.max(jnp.abs(out - ref))); scale = float(jnp.max(jnp.abs(ref)))
    print(f"{dtype:9s} {impl:12s} max|logits - f32 xla| = {err:.2e} (max|logits| {scale:.2e}) grad norm {gn:.6e} (f32 xla {ref_gn:.6e})")
