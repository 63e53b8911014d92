"""Layer-wise lr decay: the multiplier table, scanned == unrolled, FSDP update == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax.models import params as names
from vit_jax.parallel import mesh as mesh_lib, shardings as shardings_lib
from vit_jax.models.vit import VisionTransformer
from vit_jax.training import layer_decay as ld

LAYERS = 4


def _model(**overrides):
  kwargs = dict(num_classes=10, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2,
                num_layers=LAYERS, representation_size=16)
  kwargs.update(overrides)
  return VisionTransformer(**kwargs)


def _abstract_params(**overrides):
  model = _model(**overrides)
  images = jnp.zeros((1, 16, 16, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images))['params']


def _init_params(**overrides):
  model = _model(**overrides)
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']


def _by_path(tree):
  return {'/'.join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# With decay 1/2 and L = 4 (all exact in binary): block i gets 2^-(4 - i), the
# embeddings 2^-5, encoder_norm / pre_logits / head 1.
EXPECTED_4_LAYERS = {
    'embedding': 1 / 32,
    'cls': 1 / 32,
    'Transformer/posembed_input': 1 / 32,
    'Transformer/encoderblock_0': 1 / 16,
    'Transformer/encoderblock_1': 1 / 8,
    'Transformer/encoderblock_2': 1 / 4,
    'Transformer/encoderblock_3': 1 / 2,
    'Transformer/encoder_norm': 1.0,
    'pre_logits': 1.0,
    'head': 1.0,
}


def _group(path):
  """The EXPECTED_4_LAYERS entry that `path` belongs to (exactly one)."""
  groups = [g for g in EXPECTED_4_LAYERS if path == g or path.startswith(g + '/')]
  assert len(groups) == 1, path
  return groups[0]


def test_multipliers_of_a_4_layer_model():
  params = _abstract_params()
  mult = _by_path(ld.layer_decay_multipliers(params, 0.5, LAYERS))
  assert len(mult) == len(jax.tree.leaves(params))
  for path, value in mult.items():
    assert isinstance(value, float) and value == EXPECTED_4_LAYERS[_group(path)], path
  assert mult['Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel'] == 0.5
  assert mult['embedding/kernel'] == 0.5**5 and mult['head/bias'] == 1.0
  # The prefixes cover every parameter group of the model.
  assert {_group(path) for path in mult} == set(EXPECTED_4_LAYERS)


def test_hybrid_stem_and_map_head_and_params_wrapper():
  params = {'params': _abstract_params(resnet_layers=(1,), patch_size=1, classifier='map',
                                       representation_size=None)}
  mult = _by_path(ld.layer_decay_multipliers(params, 0.5, LAYERS))
  stem = [p for p in mult if p.split('/')[1] in ('conv_root', 'gn_root', 'block1')]
  assert stem and all(mult[p] == 1 / 32 for p in stem)
  assert mult['params/MAPHead_0/MlpBlock_0/Dense_0/kernel'] == 1.0
  assert mult['params/Transformer/encoderblock_0/LayerNorm_0/scale'] == 1 / 16


def test_scanned_layout_gets_per_layer_arrays():
  params = _abstract_params(scan=True)
  mult = _by_path(ld.layer_decay_multipliers(params, 0.5, LAYERS))
  kernel = mult['Transformer/encoderblock/MlpBlock_0/Dense_0/kernel']
  leaf = _by_path(params)['Transformer/encoderblock/MlpBlock_0/Dense_0/kernel']
  assert leaf.shape == (LAYERS, 32, 64)
  assert kernel.shape == (LAYERS, 1, 1) and kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel.ravel(), [1 / 16, 1 / 8, 1 / 4, 1 / 2])
  bias = mult['Transformer/encoderblock/MlpBlock_0/Dense_0/bias']
  assert bias.shape == (LAYERS, 1)
  assert mult['embedding/kernel'] == 1 / 32 and mult['head/kernel'] == 1.0


def _scaled(params, updates, decay):
  mult = ld.layer_decay_multipliers(params, decay, LAYERS)
  return ld.scale_by_layer_decay(mult).update(updates, optax.EmptyState())[0]


def test_scanned_and_unrolled_scale_updates_the_same():
  unrolled = _init_params()
  updates = jax.tree.map(lambda p: jnp.ones_like(p) + p, unrolled)
  to_scan = jax.jit(names.unrolled_to_scan)
  from_unrolled = to_scan(_scaled(unrolled, updates, 0.7))
  from_scanned = _scaled(to_scan(unrolled), to_scan(updates), 0.7)
  assert jax.tree.structure(from_unrolled) == jax.tree.structure(from_scanned)
  for a, b in zip(jax.tree.leaves(from_unrolled), jax.tree.leaves(from_scanned)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # Row i of a scanned leaf is decay^(L - i) times the update.
  bias = to_scan(updates)['Transformer']['encoderblock']['MlpBlock_0']['Dense_1']['bias']
  np.testing.assert_allclose(
      from_scanned['Transformer']['encoderblock']['MlpBlock_0']['Dense_1']['bias'],
      np.asarray(bias) * (0.7**(LAYERS - np.arange(LAYERS)))[:, None], rtol=1e-6)


@pytest.mark.parametrize('decay', [0.0, -0.5, 1.5, float('nan'), 'x'])
def test_decay_outside_0_1_names_the_config_field(decay):
  with pytest.raises(ValueError, match=r'config.layer_decay must be in \(0, 1\]'):
    ld.layer_decay_multipliers(_abstract_params(), decay, LAYERS)


def test_decay_one_is_all_ones():
  mult = ld.layer_decay_multipliers(_abstract_params(), 1.0, LAYERS)
  assert set(jax.tree.leaves(mult)) == {1.0}


def test_wrong_num_layers_and_unknown_parameters():
  with pytest.raises(ValueError, match=r'encoder blocks \[0, 1, 2, 3\], but num_layers=6'):
    ld.layer_decay_multipliers(_abstract_params(), 0.5, 6)
  with pytest.raises(ValueError, match='leading layer axis of num_layers=3'):
    ld.layer_decay_multipliers(_abstract_params(scan=True), 0.5, 3)
  params = dict(_abstract_params(), mystery={'w': jnp.zeros(2)})
  with pytest.raises(ValueError, match="does not know the depth of parameter 'mystery/w'"):
    ld.layer_decay_multipliers(params, 0.5, LAYERS)


def _optimizer(params):
  mult = ld.layer_decay_multipliers(params, 0.6, LAYERS)
  return optax.chain(optax.adamw(1e-2, weight_decay=0.1), ld.scale_by_layer_decay(mult))


def _run_steps(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, updates


@pytest.mark.parametrize('scan', [True, False])
def test_fsdp_sharded_update_equals_unsharded(scan):
  params = _init_params(scan=scan)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  grads = [jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=l.shape), l.dtype)
                                        for l in leaves]) for _ in range(2)]
  tx = _optimizer(params)
  ref_params, ref_updates = jax.jit(lambda p, g: _run_steps(tx, p, g))(params, grads)

  mesh = mesh_lib.make_mesh([('data', -1)])
  assert mesh.size == 8
  shardings = shardings_lib.param_shardings(params, mesh, fsdp=True, fsdp_min_size=256)
  specs = _by_path(shardings)
  dense = 'Transformer/encoderblock/' if scan else 'Transformer/encoderblock_1/'
  assert 'data' in specs[dense + 'MlpBlock_0/Dense_0/kernel'].spec  # really split
  put = lambda tree: jax.device_put(tree, shardings)
  out_params, out_updates = jax.jit(lambda p, g: _run_steps(tx, p, g),
                                    out_shardings=(shardings, shardings))(
                                        put(params), [put(g) for g in grads])
  for a, b in zip(jax.tree.leaves(out_params) + jax.tree.leaves(out_updates),
                  jax.tree.leaves(ref_params) + jax.tree.leaves(ref_updates)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert _by_path(out_params)[dense + 'MlpBlock_0/Dense_0/kernel'].sharding == \
      specs[dense + 'MlpBlock_0/Dense_0/kernel']

  # From the same state, the layer-decayed update is the plain AdamW update x multiplier.
  _, decayed = jax.jit(lambda p, g: _run_steps(tx, p, g))(params, grads[:1])
  plain_tx = optax.adamw(1e-2, weight_decay=0.1)
  _, plain = jax.jit(lambda p, g: _run_steps(plain_tx, p, g))(params, grads[:1])
  mult = ld.layer_decay_multipliers(params, 0.6, LAYERS)
  for u, m, plain in zip(jax.tree.leaves(decayed), jax.tree.leaves(mult),
                         jax.tree.leaves(plain)):
    np.testing.assert_allclose(u, np.asarray(plain) * m, rtol=1e-5, atol=1e-8)
