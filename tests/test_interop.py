"""timm and Hugging Face: bit-exact round trips and logit parity with the peers' forward passes.

Peers are randomly initialised (then every weight perturbed, so biases and norms matter),
converted into this project, and both forward passes compared in float32.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("transformers")

from vit_jax import checkpoints, models  # noqa: E402
from vit_jax.interop import hf, timm as vt  # noqa: E402
from vit_jax.models import params as names

TOL = 1e-4


def _config(name="ViT-Ti_16", layers=2, **overrides):
  config = models.get_config(name)
  config.num_layers = layers
  config.approximate_gelu = False  # timm and HF use exact GELU.
  config.update(overrides)
  return config


def _perturb(module, seed=0):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return module.eval()


def _images(size, batch=2):
  return np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)


def _torch_forward(module, x, **kwargs):
  with torch.no_grad():
    out = module(torch.from_numpy(x).permute(0, 3, 1, 2), **kwargs)
  return out


def _ours(config, params, x, num_classes=10):
  return np.asarray(models.from_config(config, num_classes).apply({"params": params}, x))


def _assert_state_dicts_equal(ours: dict, theirs: dict):
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("name,overrides", [
    ("ViT-Ti_16", {}),
    ("ViT-S_32", dict(hidden_size=192, mlp_dim=384, num_heads=3)),
    ("ViT-Ti_16-gap-norep", {}),
    ("ViT-Ti_16", dict(approximate_gelu=True)),  # timm's 'gelu_tanh' = the reference GELU.
])
def test_timm_parity_and_round_trip(name, overrides):
  config = _config(name, **overrides)
  peer = _perturb(vt.create_timm_model(config, num_classes=10))
  state = peer.state_dict()
  params = vt.from_timm(state, num_heads=config.num_heads)
  x = _images(224)
  diff = np.abs(_ours(config, params, x) - _torch_forward(peer, x).numpy()).max()
  print(f"timm {name} {overrides}: max abs diff {diff:.2e}")
  assert diff < TOL
  _assert_state_dicts_equal(vt.to_timm(params), state)
  # ours -> timm -> ours is bit-exact too (scanned params are accepted).
  again = vt.from_timm(vt.to_timm(models.unrolled_to_scan(params)), num_heads=config.num_heads)
  for k, v in names.flatten(params).items():
    np.testing.assert_array_equal(names.flatten(again)[k], v, err_msg=k)


def test_finetune_resolution_change_matches_timm_resample(tmp_path):
  """timm at 224 -> our model at 384 ('bilinear') vs timm's own resampled model at 384."""
  from timm.layers import resample_abs_pos_embed

  config = _config("ViT-Ti_16", layers=1)
  peer224 = _perturb(vt.create_timm_model(config, num_classes=10))
  state = peer224.state_dict()
  checkpoints.save_npz(tmp_path / "t.npz", vt.from_timm(state, num_heads=3))

  state384 = dict(state)
  state384["pos_embed"] = resample_abs_pos_embed(
      state["pos_embed"], new_size=[24, 24], num_prefix_tokens=1, interpolation="bilinear",
      antialias=False)
  peer384 = vt.create_timm_model(config, num_classes=10, img_size=384)
  peer384.load_state_dict(state384)
  peer384.eval()

  init = jax.eval_shape(models.from_config(config, 10).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 384, 384, 3), np.float32))["params"]
  params = checkpoints.load_pretrained(tmp_path / "t.npz", init, config, resample="bilinear",
                                      allow_mismatch=["head/*"])
  params["head"] = vt.from_timm(state, num_heads=3)["head"]  # Compare the whole network.
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  pe_diff = np.abs(pe - state384["pos_embed"].numpy()).max()
  x = _images(384, batch=1)
  diff = np.abs(_ours(config, params, x) - _torch_forward(peer384, x).numpy()).max()
  print(f"timm 224->384 bilinear: posemb max abs diff {pe_diff:.2e}, logits {diff:.2e}")
  assert pe_diff < 1e-6 and diff < TOL


def test_bicubic_matches_torch_interpolate():
  grid = np.random.default_rng(1).normal(size=(7, 7, 5)).astype(np.float32)
  ours = models.resample_grid(grid, (12, 12), "bicubic")
  theirs = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=(12, 12), mode="bicubic",
      align_corners=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("resnet_layers,patch", [((1, 1), 1), ((), 8)])
def test_timm_hybrid_parity(resnet_layers, patch):
  config = _config("R26+ViT-S_32", layers=1, hidden_size=64, mlp_dim=128, num_heads=2,
                   resnet_layers=resnet_layers, patch_size=patch, ws_form="timm")
  x = _images(64)
  for match_eps, tol in ((False, 1e-2), (True, TOL)):
    peer = _perturb(vt.create_timm_model(config, 10, img_size=64, match_eps=match_eps))
    params = vt.from_timm(peer.state_dict(), num_heads=2)
    diff = np.abs(_ours(config, params, x) - _torch_forward(peer, x).numpy()).max()
    print(f"timm hybrid {resnet_layers} match_eps={match_eps}: max abs diff {diff:.2e}")
    assert diff < tol
    _assert_state_dicts_equal(vt.to_timm(params), peer.state_dict())
  # Google's form (std + 1e-5) on the same weights is a different function, although
  # close: the GroupNorm after every conv cancels most of the scale difference.
  config.ws_form = "reference"
  reference_diff = np.abs(_ours(config, params, x) - _torch_forward(peer, x).numpy()).max()
  print(f"timm hybrid {resnet_layers} vs ws_form='reference': max abs diff "
        f"{reference_diff:.2e}")
  assert reference_diff > 4 * diff
  with pytest.raises(ValueError, match="set ws_form='timm'"):
    vt.create_timm_model(config, 10, img_size=64)


def test_hf_classification_parity_round_trip_and_hub_files(tmp_path):
  import safetensors.numpy
  from transformers import ViTForImageClassification

  config = _config("ViT-Ti_16")
  peer = _perturb(ViTForImageClassification(hf.hf_config(config, 10)))
  params = hf.from_hf(peer.state_dict(), num_heads=3)
  x = _images(224)
  theirs = _torch_forward(peer, x).logits.numpy()
  diff = np.abs(_ours(config, params, x) - theirs).max()
  print(f"HF ViTForImageClassification: max abs diff {diff:.2e}")
  assert diff < TOL
  _assert_state_dicts_equal(hf.to_hf(params, naming="v5"), peer.state_dict())
  # Written in the Hub's names, the files load with from_pretrained and give the same logits.
  safetensors.numpy.save_file(hf.to_hf(params), str(tmp_path / "model.safetensors"))
  hf.hf_config(config, 10).save_pretrained(tmp_path)
  loaded = ViTForImageClassification.from_pretrained(tmp_path).eval()
  np.testing.assert_array_equal(_torch_forward(loaded, x).logits.numpy(), theirs)
  again = hf.from_hf(safetensors.numpy.load_file(str(tmp_path / "model.safetensors")),
                     num_heads=3)
  for k, v in names.flatten(params).items():
    np.testing.assert_array_equal(names.flatten(again)[k], v, err_msg=k)


def test_hf_vit_model_pooler_is_pre_logits():
  from transformers import ViTModel

  config = _config("ViT-Ti_16", representation_size=48)
  peer = _perturb(ViTModel(hf.hf_config(config)))
  params = hf.from_hf(peer.state_dict(), num_heads=3)
  assert params["pre_logits"]["kernel"].shape == (192, 48)
  x = _images(224)
  pooled = _torch_forward(peer, x).pooler_output.numpy()
  ours = np.asarray(models.from_config(config, None).apply({"params": params}, x))
  diff = np.abs(ours - pooled).max()
  print(f"HF ViTModel pooler vs pre_logits: max abs diff {diff:.2e}")
  assert diff < TOL
  _assert_state_dicts_equal(hf.to_hf(params, naming="v5"), peer.state_dict())


def test_unsupported_features_fail_clearly():
  config = _config("ViT-Ti_16")
  peer = vt.create_timm_model(config, 10)
  state = dict(peer.state_dict())
  state["blocks.0.ls1.gamma"] = torch.ones(192)
  with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
    vt.from_timm(state, num_heads=3)
  with pytest.raises(ValueError, match="pre_logits"):
    vt.to_timm({"pre_logits": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}})
  with pytest.raises(ValueError, match="class token"):
    hf.to_hf({"embedding": {"kernel": np.zeros((16, 16, 3, 8)), "bias": np.zeros(8)}})
  with pytest.raises(ValueError, match="heads"):
    vt.from_timm(peer.state_dict(), num_heads=5)
