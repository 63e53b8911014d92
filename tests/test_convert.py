"""`python -m vit_jax.convert`: every format pair round-trips bit-exactly; clear errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoints, convert, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  """A random 'testing' model (patch 4, width 32, 2 heads, 16 px) saved as .npz."""
  model = models.create("testing", num_classes=5)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) * 0.3
                                     for x in leaves])
  path = tmp_path_factory.mktemp("src") / "params.npz"
  checkpoints.save_npz(path, params)
  return path


def _assert_same_npz(a, b):
  fa, fb = np.load(a), np.load(b)
  assert sorted(fa.files) == sorted(fb.files)
  for k in fa.files:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_npz_orbax_npz(tmp_path, npz):
  assert convert.main([str(npz), str(tmp_path / "orbax")]) == 0
  assert convert.detect_format(tmp_path / "orbax", output=False) == "orbax"
  assert convert.main([str(tmp_path / "orbax"), str(tmp_path / "back.npz")]) == 0
  _assert_same_npz(npz, tmp_path / "back.npz")


@pytest.mark.parametrize("name,extra", [("t.pth", []), ("t.safetensors", ["--to", "timm"])])
def test_npz_timm_npz(tmp_path, npz, name, extra):
  pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  assert convert.main([str(npz), str(tmp_path / name)] + extra) == 0
  assert convert.detect_format(tmp_path / name, output=False) == "timm"
  assert convert.main([str(tmp_path / name), str(tmp_path / "back.npz"),
                       "--model", "testing"]) == 0
  _assert_same_npz(npz, tmp_path / "back.npz")


def test_npz_hf_directory_loads_in_transformers(tmp_path, npz):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  assert convert.main([str(npz), str(tmp_path / "hf"), "--to", "hf"]) == 0
  peer = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
  assert peer.config.hidden_act == "gelu_pytorch_tanh" and peer.config.layer_norm_eps == 1e-6
  x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = peer(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
  params = checkpoints.load_npz(npz)
  ours = models.create("testing", num_classes=5).apply({"params": params}, x)
  assert np.abs(np.asarray(ours) - theirs).max() < 1e-4
  # Back without --model: config.json gives the heads.
  assert convert.main([str(tmp_path / "hf"), str(tmp_path / "back.npz")]) == 0
  _assert_same_npz(npz, tmp_path / "back.npz")


def test_clear_errors(tmp_path, npz, capsys):
  assert convert.main([str(npz), str(tmp_path / "x.safetensors")]) == 2
  assert "--to timm or --to hf" in capsys.readouterr().err
  pytest.importorskip("torch")
  convert.main([str(npz), str(tmp_path / "t.pth")])
  assert convert.main([str(tmp_path / "t.pth"), str(tmp_path / "b.npz")]) == 2
  assert "--model NAME" in capsys.readouterr().err
  assert convert.main([str(tmp_path / "missing.npz"), str(tmp_path / "b.npz")]) == 2
  assert "No checkpoint at" in capsys.readouterr().err


def test_module_entry_point(tmp_path, npz):
  result = subprocess.run(
      [sys.executable, "-m", "vit_jax.convert", str(npz), str(tmp_path / "copy.npz")],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr
  assert "(npz) ->" in result.stdout and "parameters" in result.stdout
  _assert_same_npz(npz, tmp_path / "copy.npz")
