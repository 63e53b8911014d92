"""Exponential moving average (EMA) of parameters, for evaluating a smoothed model.

  ema_0 = params_0 (`init_ema`),  ema_t = decay ema_{t-1} + (1 - decay) params_t,

so after k updates ema_k = decay^k p_0 + (1 - decay) sum_{i=1..k} decay^(k-i) p_i.
Pure pytree math in float32 whatever the parameters' dtype; `decay` may be a traced
scalar, so the update can live inside the jitted train step (sharded like the params).

`warmup_decay(decay, step) = min(decay, (1 + step) / (10 + step))` (TF's
ExponentialMovingAverage with num_updates) is opt-in: it only matters when the EMA
starts from a random initialisation, where a plain 0.9999 would stay near the random
weights for ~10k steps. Fine-tuning starts the EMA from the pre-trained weights, which
are worth averaging in from the first step, hence the plain decay by default.
"""

import jax
import jax.numpy as jnp


def init_ema(params):
  """float32 copy of `params`: ema_0 = p_0."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def _check_decay(decay):
  if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
    raise ValueError(f'EMA decay must be in [0, 1] (e.g. 0.9999), got {decay}.')


def ema_update(ema_params, params, decay):
  """decay * ema + (1 - decay) * params for every leaf, in float32."""
  _check_decay(decay)
  decay = jnp.asarray(decay, jnp.float32)

  def update(ema, p):
    return decay * jnp.asarray(ema, jnp.float32) + (1.0 - decay) * jnp.asarray(p, jnp.float32)

  return jax.tree.map(update, ema_params, params)


def warmup_decay(decay, step):
  """min(decay, (1 + step) / (10 + step)): 0.1 at step 0, reaching 0.9999 near step 90k."""
  _check_decay(decay)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))
