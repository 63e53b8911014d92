"""Evaluations: few-shot probes, attention distance and rollout, posemb similarity, plots."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import checkpoints, models
from vit_jax.evaluate import analysis, attention, fewshot, plots, posemb


def _clusters(n_per_class, num_classes=4, dim=8, seed=0, spread=0.1):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * 3
  labels = np.repeat(np.arange(num_classes), n_per_class)
  return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_linear_probe_is_the_ridge_solution():
  x, y = _clusters(10, seed=1, spread=1.0)
  reg = 0.5
  probe = fewshot.fit_linear_probe(x, y, num_classes=4, reg=reg)
  # Independent check: ridge as an augmented least-squares problem (bias unregularised).
  z = (x - x.mean(0)) / (x.std(0) + 1e-6)
  design = np.concatenate([z, np.ones((len(z), 1))], axis=1)
  augmented = np.concatenate([design, np.sqrt(reg) * np.eye(9)[:8]], axis=0)
  targets = np.concatenate([2 * np.eye(4)[y] - 1, np.zeros((8, 4))], axis=0)
  want, *_ = np.linalg.lstsq(augmented, targets, rcond=None)
  np.testing.assert_allclose(probe.weights, want, atol=1e-8)


def test_fewshot_accuracy_separates_clusters_and_not_noise():
  train_x, train_y = _clusters(20, seed=2)
  test_x, test_y = _clusters(25, seed=2)
  test_x = test_x + np.random.default_rng(3).normal(size=test_x.shape) * 0.1
  acc = fewshot.fewshot_accuracy(train_x, train_y, test_x, test_y, shots=5, num_classes=4)
  assert acc == 1.0
  noise = np.random.default_rng(4).normal(size=test_x.shape)
  chance = fewshot.fewshot_accuracy(noise, test_y, noise[::-1], test_y, shots=5,
                                    num_classes=4)
  assert chance < 0.6


def test_sample_shots_and_errors():
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  index = fewshot.sample_shots(labels, 2, seed=0)
  assert np.bincount(labels[index]).tolist() == [2, 2, 2]
  np.testing.assert_array_equal(index, fewshot.sample_shots(labels, 2, seed=0))
  with pytest.raises(ValueError, match="Class 0 has only 3 examples, fewer than 4 shots"):
    fewshot.sample_shots(labels, 4)
  with pytest.raises(ValueError, match=r"Labels must lie in \[0, 2\)"):
    fewshot.fit_linear_probe(np.zeros((9, 2)), labels, num_classes=2)


def test_mean_attention_distance_by_hand():
  tokens = 5  # Class token + a 2x2 grid of 16-pixel patches.
  identity = np.eye(tokens)[None]  # [heads=1, tokens, tokens]
  np.testing.assert_allclose(attention.mean_attention_distance(identity, (2, 2), 16), [0.0])
  uniform = np.full((1, tokens, tokens), 1 / tokens)
  # Each patch sees itself (0), two neighbours (16) and the diagonal one (16 * sqrt 2).
  want = (0 + 16 + 16 + 16 * np.sqrt(2)) / 4
  np.testing.assert_allclose(attention.mean_attention_distance(uniform, (2, 2), 16), [want])


def test_rollout_by_hand():
  tokens, layers = 5, 3
  identity = np.broadcast_to(np.eye(tokens), (layers, 1, 2, tokens, tokens))
  np.testing.assert_allclose(attention.attention_rollout(identity), np.zeros((1, 4)))
  uniform = np.full((layers, 1, 2, tokens, tokens), 1 / tokens)
  rollout = attention.attention_rollout(uniform)
  np.testing.assert_allclose(rollout, rollout[:, :1].repeat(4, axis=1))  # Even over patches.
  assert 0 < rollout.sum() < 1  # The rest stays on the class token itself.


def test_model_attention_collected_for_unrolled_and_scanned():
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  model = models.create("testing", num_classes=3)
  params = model.init(jax.random.key(0), images)["params"]
  weights = attention.collect_attention(model, {"params": params}, images)
  scanned = models.create("testing", num_classes=3, scan=True)
  weights_scan = attention.collect_attention(
      scanned, {"params": models.unrolled_to_scan(params)}, images)
  assert weights.shape == (2, 2, 2, 17, 17)
  np.testing.assert_allclose(weights_scan, weights, atol=1e-6)
  distance = attention.mean_attention_distance(weights, (4, 4), 4)
  assert distance.shape == (2, 2, 2) and np.all(distance > 0)


def test_posemb_similarity():
  pe = np.random.default_rng(0).normal(size=(1, 1 + 6, 8))
  sim = posemb.posemb_similarity(pe, (2, 3))
  assert sim.shape == (2, 3, 2, 3)
  np.testing.assert_allclose([sim[i, j, i, j] for i in range(2) for j in range(3)], 1.0)
  np.testing.assert_allclose(sim[0, 1, 1, 2], sim[1, 2, 0, 1])
  with pytest.raises(ValueError, match="do not form a 3x3 grid"):
    posemb.posemb_similarity(pe, (3, 3))


def test_plots_are_pngs(tmp_path):
  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3))
  maps = np.random.default_rng(1).uniform(0, 1, (3, 16, 16))
  paths = [
      plots.plot_attention_maps(images, maps, str(tmp_path / "maps.png"), titles=[1, 2, 3]),
      plots.plot_attention_distance(np.ones((4, 2)), str(tmp_path / "distance.png")),
      plots.plot_posemb_similarity(np.ones((2, 2, 2, 2)), str(tmp_path / "pe.png")),
  ]
  for path in paths:
    with Image.open(path) as image:
      assert image.format == "PNG" and min(image.size) > 100


def test_analyze_a_workdir(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({
      "dataset": "digits", "data_dir": str(tmp_path / "data"), "train_split": "train",
      "eval_split": "test", "batch_size": 64, "eval_batch_size": 128, "data_workers": 0,
      "pp": {"crop": 16, "eval_mode": "resize", "area_range": (0.6, 1.0), "flip": False,
             "skip_corrupt": False},
      "model": models.get_config("testing").to_dict(),
  })
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  model = models.from_config(config.model, 10)
  params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  checkpoints.save_params(str(workdir / "params"), params)

  result = analysis.analyse(str(workdir), str(tmp_path / "out"), num_images=3, shots=(1, 5),
                           fewshot_examples=300)
  assert sorted(os.path.basename(p) for p in result["plots"]) == [
      "attention_distance.png", "attention_maps.png", "embedding_filters.png",
      "posemb_similarity.png"]
  assert np.asarray(result["attention_distance"]).shape == (2, 2)
  # Random features of digits are still far better than chance (10 %) with 5 shots.
  assert 0.2 < result["fewshot"]["5shot"] <= 1.0
  saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
  assert saved["fewshot"] == result["fewshot"]
  # Figure 7 (left): the testing model's 4x4x3 kernel has 32 filters, so 28 components
  # of 48 dimensions; their ratios are the squared singular values of the centred filters.
  filters = np.asarray(params["embedding"]["kernel"]).reshape(48, -1).T
  singular = np.linalg.svd(filters - filters.mean(axis=0), compute_uv=False)
  np.testing.assert_allclose(saved["embedding_filters"]["explained_variance_ratio"],
                             singular[:28]**2 / np.sum(singular**2), rtol=1e-6)


def test_embedding_filters_skip_hybrids(tmp_path):
  rng = np.random.default_rng(0)
  plain = {"embedding": {"kernel": rng.normal(size=(2, 2, 3, 8))}}
  result = analysis.embedding_filters(plain, str(tmp_path / "f.png"))
  assert len(result["explained_variance_ratio"]) == 8  # min(28, 8 filters, 12 dims).
  assert os.path.exists(result["plot"])
  # A hybrid's embedding is a 1x1 conv over ResNet channels: no RGB filters to show.
  hybrid = {"conv_root": {"kernel": np.zeros((7, 7, 3, 4))},
            "embedding": {"kernel": rng.normal(size=(1, 1, 16, 8))}}
  assert analysis.embedding_filters(hybrid, str(tmp_path / "h.png")) is None
