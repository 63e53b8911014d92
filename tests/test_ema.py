"""EMA of parameters: the closed form after k steps, float32, jit, warmup schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.training import ema


def _params(rng):
  return {'dense': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,))},
          'scale': rng.normal(size=())}


@pytest.mark.parametrize('decay', [0.0, 0.5, 0.9, 0.999, 1.0])
def test_ema_after_k_steps_is_the_closed_form(decay):
  rng = np.random.default_rng(0)
  sequence = [_params(rng) for _ in range(8)]  # p_0 .. p_7
  state = ema.init_ema(sequence[0])
  update = jax.jit(ema.ema_update)
  for p in sequence[1:]:
    state = update(state, p, decay)
  k = len(sequence) - 1

  def closed_form(*leaves):
    total = decay**k * leaves[0]
    for i in range(1, k + 1):
      total = total + (1 - decay) * decay**(k - i) * leaves[i]
    return total

  expected = jax.tree.map(closed_form, *sequence)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_params_give_a_float32_ema():
  params = {'w': jnp.full((2,), 3.0, jnp.bfloat16)}
  state = ema.init_ema({'w': jnp.zeros((2,), jnp.bfloat16)})
  state = ema.ema_update(state, params, 0.75)
  assert state['w'].dtype == jnp.float32
  np.testing.assert_array_equal(state['w'], [0.75, 0.75])


def test_traced_decay_and_warmup():
  np.testing.assert_allclose(ema.warmup_decay(0.9999, 0), 0.1, rtol=1e-6)
  np.testing.assert_allclose(ema.warmup_decay(0.9999, 10), 11 / 20, rtol=1e-6)
  np.testing.assert_allclose(ema.warmup_decay(0.99, 10**6), 0.99, rtol=1e-6)
  step = jnp.int32(90)
  out = jax.jit(lambda s, p, t: ema.ema_update(s, p, ema.warmup_decay(0.999, t)))(
      {'w': jnp.zeros(())}, {'w': jnp.ones(())}, step)
  np.testing.assert_allclose(out['w'], 1 - 91 / 100, rtol=1e-5)


def test_bad_decay_and_mismatched_trees():
  with pytest.raises(ValueError, match=r'EMA decay must be in \[0, 1\]'):
    ema.ema_update({'w': 0.0}, {'w': 1.0}, 1.5)
  with pytest.raises(ValueError):
    ema.ema_update({'w': 0.0}, {'v': 1.0}, 0.5)
