"""`.npz` checkpoints: layouts, round trips, resampling, fine-tuning loads, bad files."""

import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vit_jax import checkpoints, models
from vit_jax.checkpoints import CheckpointError
from vit_jax.models import params as names


def _init(model, image_size=16):
  """The model's parameter shapes (no compile): jax.ShapeDtypeStruct leaves."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _random_like(params, seed=1):
  """Every leaf random (the init has zero heads and biases, which would hide mistakes)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])


@pytest.fixture(scope="module")
def tiny():
  model = models.create("testing", num_classes=5)
  return model, _random_like(_init(model))


def _assert_trees_equal(a, b):
  fa, fb = names.flatten(a), names.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _write_npz(path, flat):
  np.savez(path, **flat)
  return path


def test_npz_round_trip_is_bit_exact(tmp_path, tiny):
  _, params = tiny
  checkpoints.save_npz(tmp_path / "a.npz", params)
  loaded = checkpoints.load_npz(tmp_path / "a.npz")
  _assert_trees_equal(params, loaded)
  checkpoints.save_npz(tmp_path / "b.npz", loaded)
  a = np.load(tmp_path / "a.npz")
  b = np.load(tmp_path / "b.npz")
  assert sorted(a.files) == sorted(b.files)
  assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel" in a.files
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  # bfloat16/float16 checkpoints keep their dtype.
  half = jax.tree.map(lambda x: x.astype(np.float16), params)
  checkpoints.save_npz(tmp_path / "h.npz", half)
  _assert_trees_equal(half, checkpoints.load_npz(tmp_path / "h.npz"))


def test_old_numbering_prefix_and_groupnorm_shapes(tmp_path, tiny):
  _, params = tiny
  flat = names.flatten(params)
  old = {}
  renames = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
             "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
  for k, v in flat.items():
    parts = k.split("/")
    if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      parts[2] = renames.get(parts[2], parts[2])
    old["opt/target/" + "/".join(parts)] = v
  old["opt/target/gn_root/scale"] = np.arange(4, dtype=np.float32).reshape(1, 1, 1, 4)
  old["opt/target/block1/unit1/gn1/bias"] = np.ones((1, 1, 1, 4), np.float32)
  loaded = names.flatten(checkpoints.load_npz(_write_npz(tmp_path / "old.npz", old)))
  np.testing.assert_array_equal(loaded.pop("gn_root/scale"), np.arange(4))
  assert loaded.pop("block1/unit1/gn1/bias").shape == (4,)
  _assert_trees_equal(flat, loaded)


def test_big_vision_layout_scanned_and_grid_only_posemb(tmp_path, tiny):
  """big_vision: params/ prefix, stacked blocks, posemb over the grid only (no cls row)."""
  model, params = tiny
  scanned = jax.tree.map(np.asarray, models.unrolled_to_scan(params))
  flat = names.flatten(scanned)
  pe = flat.pop("Transformer/posembed_input/pos_embedding")
  flat["pos_embedding"] = pe[:, 1:]  # big_vision stores only the 16 grid positions.
  bv = {"params/" + k: v for k, v in flat.items()}
  bv["opt/1/mu/embedding/kernel"] = np.ones(3)  # Optimizer state beside the params: ignored.
  loaded = checkpoints.load_npz(_write_npz(tmp_path / "bv.npz", bv))
  lpe = loaded["Transformer"]["posembed_input"]["pos_embedding"]
  assert lpe.shape == (1, 17, 32)
  np.testing.assert_array_equal(lpe[0, 0], 0.0)  # The class token gets no embedding.
  np.testing.assert_array_equal(lpe[:, 1:], pe[:, 1:])
  # Same function as big_vision's: its cls token is prepended after the grid embedding.
  reference = dict(params)
  reference["Transformer"] = dict(params["Transformer"])
  reference["Transformer"]["posembed_input"] = {"pos_embedding": np.asarray(lpe)}
  _assert_trees_equal(reference, loaded)


def test_save_npz_of_scanned_params_writes_reference_layout(tmp_path, tiny):
  _, params = tiny
  checkpoints.save_npz(tmp_path / "s.npz", {"params": models.unrolled_to_scan(params)})
  _assert_trees_equal(params, checkpoints.load_npz(tmp_path / "s.npz"))


def test_resample_zoom_matches_hand_computed_grid():
  # 2x2 grid -> 3x3 with order-1 zoom: corners kept, edges/centre are the averages.
  grid = np.array([[0., 2.], [4., 6.]], np.float32)
  posemb = np.concatenate([[[-1.]], grid.reshape(4, 1)])[None]  # [1, 1 + 4, 1]
  out = models.resample_posemb(posemb, (3, 3), num_prefix_tokens=1)
  expected = np.array([[0., 1., 2.], [2., 3., 4.], [4., 5., 6.]])
  assert out.shape == (1, 10, 1)
  assert out[0, 0, 0] == -1.  # The class token's row is untouched.
  np.testing.assert_allclose(out[0, 1:, 0].reshape(3, 3), expected, atol=1e-6)


def test_resample_224_to_384_matches_reference_method():
  rng = np.random.default_rng(0)
  posemb = rng.normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  out = models.resample_posemb(posemb, (24, 24), 1)
  ref_grid = scipy.ndimage.zoom(posemb[0, 1:].reshape(14, 14, 8), (24 / 14, 24 / 14, 1), order=1)
  np.testing.assert_array_equal(out[0, 1:], ref_grid.reshape(576, 8))
  np.testing.assert_array_equal(out[0, :1], posemb[0, :1])
  # bilinear (align_corners=False): a 2x2 -> 4x4 upsample, computed by hand on one row.
  row = models.resample_grid(np.array([[[0.], [4.]], [[0.], [4.]]]), (2, 4), "bilinear")
  np.testing.assert_allclose(row[0, :, 0], [0., 1., 3., 4.])


def test_resample_rejects_non_square_and_unknown_method():
  with pytest.raises(ValueError, match="square"):
    models.resample_posemb(np.zeros((1, 1 + 6, 4)), (3, 3), 1)
  with pytest.raises(ValueError, match="bilinear"):
    models.resample_grid(np.zeros((2, 2, 1)), (3, 3), "nearest")


def test_load_pretrained_new_head_new_resolution(tmp_path, tiny):
  model, params = tiny
  checkpoints.save_npz(tmp_path / "p.npz", params)
  config = models.get_config("testing")
  new_model = models.create("testing", num_classes=3)
  init = _init(new_model, image_size=24)  # 6x6 grid instead of 4x4.
  new = checkpoints.load_pretrained(tmp_path / "p.npz", init, config)
  np.testing.assert_array_equal(new["head"]["kernel"], np.zeros((32, 3)))
  np.testing.assert_array_equal(new["head"]["bias"], np.zeros(3))
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  expected = models.resample_posemb(pe, (6, 6), 1)
  np.testing.assert_array_equal(new["Transformer"]["posembed_input"]["pos_embedding"], expected)
  np.testing.assert_array_equal(new["embedding"]["kernel"], params["embedding"]["kernel"])
  logits = new_model.apply({"params": new}, jnp.ones((2, 24, 24, 3)))
  assert logits.shape == (2, 3)


def test_load_pretrained_pre_logits_kept_or_dropped(tmp_path):
  rep = models.create("testing", num_classes=5, representation_size=16)
  params = _random_like(_init(rep))
  checkpoints.save_npz(tmp_path / "rep.npz", params)
  init = _init(models.create("testing", num_classes=4))
  new = checkpoints.load_pretrained(tmp_path / "rep.npz", init, models.get_config("testing"))
  assert "pre_logits" not in new
  cfg = models.get_config("testing")
  cfg.representation_size = 16
  init_rep = _init(models.create("testing", num_classes=4, representation_size=16))
  kept = checkpoints.load_pretrained(tmp_path / "rep.npz", init_rep, cfg)
  np.testing.assert_array_equal(kept["pre_logits"]["kernel"], params["pre_logits"]["kernel"])


def test_load_pretrained_into_scanned_model_with_sharding(tmp_path, tiny):
  _, params = tiny
  checkpoints.save_npz(tmp_path / "p.npz", params)
  cfg = models.get_config("testing")
  cfg.scan = True
  model = models.from_config(cfg, num_classes=5)
  init = _init(model)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  init = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), init)
  new = checkpoints.load_pretrained(tmp_path / "p.npz", {"params": init}, cfg)["params"]
  q = new["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  assert q.shape == (2, 32, 2, 16) and q.sharding == sharding
  np.testing.assert_array_equal(
      q[1], params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]["query"]["kernel"])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  base = models.create("testing", num_classes=5)
  p2 = dict(params, head=jax.tree.map(np.asarray, new["head"]))
  np.testing.assert_allclose(model.apply({"params": new}, x), base.apply({"params": p2}, x),
                             atol=1e-5)


def test_wrong_model_lists_the_mismatched_keys(tmp_path, tiny):
  """"B/16 weights into L/16" in miniature: wider and deeper target, found before training."""
  _, params = tiny
  checkpoints.save_npz(tmp_path / "p.npz", params)
  bigger = models.create("testing", num_classes=5, hidden_size=48, num_layers=3)
  init = _init(bigger)
  with pytest.raises(CheckpointError) as info:
    checkpoints.load_pretrained(tmp_path / "p.npz", init, models.get_config("testing"))
  msg = str(info.value)
  assert "key(s) missing from the checkpoint: Transformer/encoderblock_2/" in msg
  assert "36 key(s) with different shapes: Transformer/encoder_norm/bias: checkpoint (32,) vs model (48,)" in msg
  assert "allow_mismatch" in msg


def test_allow_mismatch_keeps_fresh_values(tmp_path, tiny):
  _, params = tiny
  checkpoints.save_npz(tmp_path / "p.npz", params)
  deeper = models.create("testing", num_classes=5, num_layers=3)
  init = _random_like(_init(deeper), seed=2)
  new = checkpoints.load_pretrained(tmp_path / "p.npz", init, models.get_config("testing"),
                                   allow_mismatch=["Transformer/encoderblock_2/*"])
  np.testing.assert_array_equal(new["Transformer"]["encoderblock_2"]["LayerNorm_0"]["scale"],
                                init["Transformer"]["encoderblock_2"]["LayerNorm_0"]["scale"])
  np.testing.assert_array_equal(new["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
                                params["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"])


def test_truncated_npz_gives_clear_error(tmp_path, tiny):
  _, params = tiny
  checkpoints.save_npz(tmp_path / "p.npz", params)
  data = (tmp_path / "p.npz").read_bytes()
  (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated"):
    checkpoints.load_npz(tmp_path / "t.npz")
  (tmp_path / "n.npz").write_bytes(b"<html>404 Not Found</html>")
  with pytest.raises(CheckpointError, match="not an .npz"):
    checkpoints.load_npz(tmp_path / "n.npz")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.load_npz(tmp_path / "missing.npz")


def test_pickled_npz_is_refused(tmp_path):
  np.savez(tmp_path / "pk.npz", obj=np.array([{"evil": 1}], dtype=object),
           embedding=np.zeros(3))
  with pytest.raises(CheckpointError, match="pickled"):
    checkpoints.load_npz(tmp_path / "pk.npz")
