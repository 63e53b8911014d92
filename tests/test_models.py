"""The ViT family: parameter counts, the reference tree and logits, options and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from reference_vit import RefViT
from vit_jax import models
from vit_jax.models import posembed

REFERENCE_COUNTS = {
    "ViT-Ti_16": 5_717_416, "ViT-S_16": 22_050_664, "ViT-S_32": 22_878_952,
    "ViT-B_8": 86_576_872, "ViT-B_16": 86_567_656, "ViT-B_32": 88_224_232,
    "ViT-L_16": 304_326_632, "ViT-L_32": 306_535_400, "ViT-H_14": 632_045_800,
    "R+ViT-Ti_16": 6_337_704, "R26+ViT-S_32": 36_431_912, "R26+ViT-B_32": 101_383_976,
    "R50+ViT-B_16": 98_659_112, "R50+ViT-L_32": 328_994_856,
    "ViT-B_16-gap-norep": 86_566_120,
}


def _images(shape=(2, 16, 16, 3), seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, shape), jnp.float32)


def _randomize(tree, seed=1, scale=0.05):
  """Random values everywhere, so zero-initialised heads cannot hide a mismatch."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _shapes(tree):
  return {k: tuple(v.shape) for k, v in flatten_dict(tree, sep="/").items()}


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_parameter_count_equals_reference(name):
  model = models.create(name, num_classes=1000)
  assert models.count_params(models.param_shapes(model, 224)) == REFERENCE_COUNTS[name]


def test_every_registered_name_builds():
  assert len(models.MODEL_NAMES) >= 15 + 9  # 14 reference models, testing, 9 gap variants.
  for name in models.MODEL_NAMES:
    config = models.get_config(name)
    assert config.name == name
    assert models.count_params(models.param_shapes(models.from_config(config, 10),
                                                     config.image_size)) > 0


@pytest.mark.parametrize("kwargs, image_size", [
    (dict(patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2), 16),
    (dict(patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2,
          classifier="gap", representation_size=24), 16),
    (dict(patch_size=1, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
          resnet_layers=(1, 1)), 16),
])
def test_reference_parameters_apply_unchanged_and_give_same_logits(kwargs, image_size):
  images = _images((2, image_size, image_size, 3))
  reference = RefViT(num_classes=7, **kwargs)
  ref_params = _randomize(reference.init(jax.random.key(0), images)["params"])
  ours = models.VisionTransformer(num_classes=7, **kwargs)
  our_params = ours.init(jax.random.key(0), images)["params"]

  assert _shapes(our_params) == _shapes(ref_params)
  want = reference.apply({"params": ref_params}, images)
  got = ours.apply({"params": ref_params}, images)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  assert float(jnp.abs(want).max()) > 1e-2  # A real comparison, not of zeros.


def test_default_tree_has_reference_names():
  params = models.create("testing", num_classes=3).init(jax.random.key(0), _images())["params"]
  shapes = _shapes(params)
  d, heads = 32, 2
  expected = {
      "cls": (1, 1, d),
      "embedding/kernel": (4, 4, 3, d),
      "Transformer/posembed_input/pos_embedding": (1, 17, d),
      "Transformer/encoderblock_0/LayerNorm_0/scale": (d,),
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel": (d, heads, d // heads),
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/bias": (heads, d // heads),
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel": (heads, d // heads, d),
      "Transformer/encoderblock_1/LayerNorm_1/bias": (d,),
      "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel": (d, 128),
      "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel": (128, d),
      "Transformer/encoder_norm/scale": (d,),
      "head/kernel": (d, 3),
  }
  for key, shape in expected.items():
    assert shapes[key] == shape, key
  assert not any(k.startswith("pre_logits") for k in shapes)
  np.testing.assert_array_equal(params["head"]["kernel"], 0)


def test_head_bias_init_and_gelu_switch():
  images = _images()
  model = models.create("testing", num_classes=4, head_bias_init=-10.0)
  params = model.init(jax.random.key(0), images)["params"]
  np.testing.assert_allclose(model.apply({"params": params}, images), -10.0)
  params = _randomize(params)
  tanh = models.create("testing", num_classes=4).apply({"params": params}, images)
  erf = models.create("testing", num_classes=4, approximate_gelu=False).apply(
      {"params": params}, images)
  diff = float(jnp.abs(tanh - erf).max())
  assert 1e-7 < diff < 1e-2  # Different functions, close values.


@pytest.mark.parametrize("classifier, shape", [
    ("token", (2, 5)), ("gap", (2, 5)), ("map", (2, 5)),
    ("unpooled", (2, 16, 5)), ("token_unpooled", (2, 17, 5)),
])
def test_output_shape_per_classifier(classifier, shape):
  model = models.create("testing", num_classes=5, classifier=classifier)
  variables = model.init(jax.random.key(0), _images())
  assert model.apply(variables, _images()).shape == shape
  features = models.create("testing", num_classes=None, classifier=classifier)
  assert features.apply(variables, _images()).shape == shape[:-1] + (32,)


@pytest.mark.parametrize("posemb", models.POSEMB_TYPES)
@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_scanned_and_unrolled_give_same_logits(posemb, classifier):
  images = _images()
  unrolled = models.create("testing", num_classes=5, posemb=posemb, classifier=classifier)
  scanned = models.create("testing", num_classes=5, posemb=posemb, classifier=classifier,
                          scan=True, remat_policy="nothing_saveable")
  params = _randomize(unrolled.init(jax.random.key(0), images)["params"])
  stacked = models.unrolled_to_scan(params)
  assert _shapes(stacked) == _shapes(scanned.init(jax.random.key(0), images)["params"])
  np.testing.assert_allclose(scanned.apply({"params": stacked}, images),
                             unrolled.apply({"params": params}, images), atol=1e-5)
  back = models.scan_to_unrolled(stacked)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


def test_layout_conversion_is_idempotent_and_checks_input():
  params = models.create("testing", num_classes=2).init(jax.random.key(0), _images())["params"]
  stacked = models.unrolled_to_scan(params)
  assert stacked["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 32)
  assert models.unrolled_to_scan(stacked) is stacked
  wrapped = models.unrolled_to_scan({"params": params})
  assert "encoderblock" in wrapped["params"]["Transformer"]
  with pytest.raises(ValueError, match="No 'Transformer' subtree"):
    models.unrolled_to_scan({"head": params["head"]})


def test_remat_and_attention_impls_keep_the_math():
  images = _images()
  base = models.create("testing", num_classes=5)
  params = _randomize(base.init(jax.random.key(0), images)["params"])
  for overrides in [dict(remat_policy="dots_saveable"), dict(attention_impl="dot_product"),
                    dict(posemb="relative", attention_impl="dot_product")]:
    model = models.create("testing", num_classes=5, **overrides)
    p = model.init(jax.random.key(0), images)["params"] if "posemb" in overrides else params
    ref = models.create("testing", num_classes=5, posemb=overrides.get("posemb", "learn"))
    np.testing.assert_allclose(model.apply({"params": p}, images),
                               ref.apply({"params": p}, images), atol=1e-5)
  grads = jax.grad(lambda p: models.create("testing", num_classes=5, remat_policy="nothing_saveable")
                   .apply({"params": p}, images).sum())(params)
  grads_ref = jax.grad(lambda p: base.apply({"params": p}, images).sum())(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, grads_ref)


def test_auto_attention_picks_cudnn_only_on_gpus_in_half_precision():
  from vit_jax.models.attention import resolve_impl
  assert resolve_impl("auto", jnp.bfloat16, False, backend="gpu") == "cudnn"
  assert resolve_impl("auto", jnp.float16, False, backend="gpu") == "cudnn"
  assert resolve_impl("auto", jnp.float32, False, backend="gpu") == "xla"
  assert resolve_impl("auto", jnp.bfloat16, True, backend="gpu") == "xla"  # relative logits
  assert resolve_impl("auto", jnp.bfloat16, False, backend="cpu") == "xla"
  assert resolve_impl("auto", jnp.bfloat16, False, backend="gpu", head_dim=36) == "xla"
  assert resolve_impl("auto", jnp.bfloat16, False, backend="gpu", head_dim=80) == "cudnn"
  assert resolve_impl("dot_product", jnp.float32, False, backend="gpu") == "dot_product"
  with pytest.raises(ValueError, match="Unknown attention impl 'flash'"):
    resolve_impl("flash", jnp.float32, False)
  images = _images()
  auto = models.create("testing", num_classes=5)
  assert auto.attention_impl == "auto"
  params = _randomize(auto.init(jax.random.key(0), images)["params"])
  explicit = models.create("testing", num_classes=5, attention_impl="xla")
  np.testing.assert_array_equal(auto.apply({"params": params}, images),
                                explicit.apply({"params": params}, images))


def test_padded_attention_equals_unpadded_outputs_and_grads():
  """The 'cudnn' path pads 197 tokens to 256 and masks them; checked here through XLA."""
  from vit_jax.models.attention import padded_dot_product_attention
  keys = jax.random.split(jax.random.key(0), 4)
  query, key, value = (jax.random.normal(k, (2, 197, 3, 8)) for k in keys[:3])
  bias = jax.random.normal(keys[3], (2, 3, 197, 197))
  for b in (None, bias):
    def loss(attention, q, k, v):
      return jnp.sum(jnp.sin(attention(q, k, v)))
    plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=b)
    padded = lambda q, k, v: padded_dot_product_attention(q, k, v, b, implementation=None)
    out = padded(query, key, value)
    assert out.shape == (2, 197, 3, 8)
    np.testing.assert_allclose(out, plain(query, key, value), atol=1e-5)
    grads = jax.grad(loss, argnums=(1, 2, 3))(padded, query, key, value)
    grads_ref = jax.grad(loss, argnums=(1, 2, 3))(plain, query, key, value)
    for g, g_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_bfloat16_compute_runs_with_float32_params():
  images = _images()
  f32 = models.create("testing", num_classes=5)
  bf16 = models.create("testing", num_classes=5, dtype="bfloat16")
  params = _randomize(f32.init(jax.random.key(0), images)["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
      bf16.init(jax.random.key(0), images)))
  out = bf16.apply({"params": params}, images)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, f32.apply({"params": params}, images), atol=0.1)


def test_position_embedding_parameters_per_type():
  def shapes(posemb, classifier="token"):
    model = models.create("testing", num_classes=2, posemb=posemb, classifier=classifier)
    return _shapes(model.init(jax.random.key(0), _images())["params"])

  assert shapes("learn", "gap")["Transformer/posembed_input/pos_embedding"] == (1, 16, 32)
  two_d = shapes("learn_2d")
  assert two_d["Transformer/posembed_input/pos_embedding_row"] == (1, 4, 16)
  assert two_d["Transformer/posembed_input/pos_embedding_col"] == (1, 4, 16)
  assert two_d["Transformer/posembed_input/pos_embedding_cls"] == (1, 1, 32)
  for kind in ("sincos2d", "none"):
    assert not any("posembed" in k or "relative" in k for k in shapes(kind))
  relative = shapes("relative")
  # (2*4-1)^2 patch offsets plus one shared index for pairs involving the class token.
  assert relative["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/relative/"
                  "relative_embedding"] == (50, 2, 16)


def test_relative_offset_index_by_hand():
  index = posembed.relative_offset_index((2, 2), num_prefix_tokens=1)
  # Offsets (dr, dc) in {-1,0,1}^2 map to (dr+1)*3 + (dc+1); the class token gets 9.
  expected = np.array([
      [9, 9, 9, 9, 9],
      [9, 4, 3, 1, 0],
      [9, 5, 4, 2, 1],
      [9, 7, 6, 4, 3],
      [9, 8, 7, 5, 4],
  ])
  np.testing.assert_array_equal(index, expected)


def test_sincos_embeddings_are_fixed_and_distinct():
  pe = posembed.sincos_2d((3, 4), 16)
  assert pe.shape == (12, 16)
  assert np.abs(pe).max() <= 1.0
  assert len({tuple(np.round(row, 6)) for row in pe}) == 12
  np.testing.assert_allclose(pe[0, :4], 0.0)  # sin(0) for the first x frequencies.


def test_intermediates_only_when_asked():
  images = _images()
  model = models.create("testing", num_classes=3)
  variables = model.init(jax.random.key(0), images)
  assert set(variables) == {"params"}
  logits, state = model.apply(variables, images, mutable="intermediates")
  inter = state["intermediates"]["Transformer"]
  weights = inter["encoderblock_1"]["MultiHeadDotProductAttention_0"]["attention_weights"][0]
  assert weights.shape == (2, 2, 17, 17)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  assert inter["encoderblock_0"]["block_output"][0].shape == (2, 17, 32)
  np.testing.assert_allclose(logits, model.apply(variables, images), atol=1e-6)


def test_dropout_and_stochastic_depth_only_in_training():
  images = _images()
  model = models.create("testing", num_classes=3, dropout_rate=0.3, stochastic_depth=0.5)
  params = _randomize(model.init(jax.random.key(0), images)["params"])
  eval_a = model.apply({"params": params}, images)
  eval_b = model.apply({"params": params}, images, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = lambda seed: model.apply({"params": params}, images, train=True,
                                   rngs={"dropout": jax.random.key(seed)})
  assert float(jnp.abs(train(0) - eval_a).max()) > 1e-4
  np.testing.assert_array_equal(train(1), train(1))


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown model name 'ViT-X_16'.*ViT-B_16.*R50\+ViT-B_16"):
    models.get_config("ViT-X_16")
  with pytest.raises(ValueError, match="Unknown model option"):
    models.create("ViT-B_16", num_classes=10, patch=16)


def test_bad_inputs_give_clear_errors():
  model = models.create("testing", num_classes=3)
  variables = model.init(jax.random.key(0), _images())
  with pytest.raises(ValueError, match=r"18x18 is not divisible by the patch size 4"):
    model.init(jax.random.key(0), _images((1, 18, 18, 3)))
  with pytest.raises(ValueError, match=r"built for 3 input channels, but the images have 1"):
    model.apply(variables, _images((1, 16, 16, 1)))
  with pytest.raises(ValueError, match=r"Position embedding 'pos_embedding' has shape "
                     r"\(1, 17, 32\) but this input needs \(1, 37, 32\)"):
    model.apply(variables, _images((1, 24, 24, 3)))
  with pytest.raises(ValueError, match="Unknown classifier 'cls'.*token"):
    models.create("testing", num_classes=3, classifier="cls").init(jax.random.key(0), _images())
  with pytest.raises(ValueError, match="Unknown position embedding type 'rope'.*learn_2d"):
    models.create("testing", num_classes=3, posemb="rope").init(jax.random.key(0), _images())
  with pytest.raises(ValueError, match="Unknown remat policy 'all'"):
    models.create("testing", num_classes=3, remat_policy="all").init(jax.random.key(0), _images())
  hybrid = models.create("R+ViT-Ti_16", num_classes=3)
  with pytest.raises(ValueError, match=r"not divisible by the ResNet stride x patch size 32"):
    jax.eval_shape(lambda: hybrid.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3))))
