"""DeiT's random erasing and repeated augmentation in the grain pipeline."""

import json
import math

import numpy as np
import pytest

import data_fixtures as fx
from configs import common
from vit_jax import data
from vit_jax.data import pipeline
from vit_jax.data import random_erasing
from vit_jax.training import config_check

# timm's RandomErasing defaults, as DeiT uses them: area 2 % to 1/3, aspect 0.3 to 1/0.3.
AREA, ASPECT = (0.02, 1 / 3), (0.3, 1 / 0.3)


def _changed_box(before, after):
  """(top, left, height, width) of the bounding box of the changed pixels, or None."""
  rows, cols = np.nonzero(np.any(before != after, axis=-1))
  if rows.size == 0:
    return None
  return rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_erased_boxes_have_the_drawn_area_and_aspect_and_fit():
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = random_erasing.erase_box(224, 224, rng)
    assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
    # Rounding each side to whole pixels moves the area and aspect a little.
    assert AREA[0] * 0.9 <= h * w / 224**2 <= AREA[1] * 1.05
    assert ASPECT[0] * 0.9 <= h / w <= ASPECT[1] * 1.1


def test_one_rectangle_of_normal_noise_replaces_the_pixels_and_nothing_else():
  image = np.full((64, 48, 3), 7, np.uint8)
  noise = []
  for seed in range(40):
    out = random_erasing.random_erase(image, np.random.default_rng(seed), prob=1.0)
    top, left, h, w = _changed_box(image, out)
    assert AREA[0] * 0.8 <= h * w / (64 * 48) <= AREA[1] * 1.1
    inside = out[top:top + h, left:left + w]
    assert np.mean(inside != 7) > 0.95  # Every pixel of the box redrawn (few hit 7).
    noise.append(inside.astype(np.float64).ravel())
  # N(0, 1) in the [-1, 1] space: 127.5 * (z + 1) clipped, so mean 127.5 and 31.7 % of the
  # values clipped to 0 or 255 (P(|z| > 1)).
  noise = np.concatenate(noise)
  assert abs(noise.mean() - 127.5) < 2
  clipped = np.mean((noise == 0) | (noise == 255))
  assert abs(clipped - 2 * (1 - 0.5 * (1 + math.erf(1 / math.sqrt(2))))) < 0.01
  assert image.max() == 7  # The input is not modified.


def test_prob_zero_returns_the_image_and_draws_nothing_and_prob_is_the_rate():
  image = np.zeros((32, 32, 3), np.uint8)
  rng = np.random.default_rng(1)
  before = rng.bit_generator.state
  assert random_erasing.random_erase(image, rng, prob=0.0) is image
  assert rng.bit_generator.state == before
  erased = sum(random_erasing.random_erase(image, rng, prob=0.25) is not image
               for _ in range(800))
  assert abs(erased / 800 - 0.25) < 0.05


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_digits"))


def _config(digits_dir, **pp):
  return fx.small_config(data_dir=digits_dir, batch_size=12,
                         pp=dict({"area_range": (0.5, 1.0), "crop": 32}, **pp))


def _batches(cfg, n, state=None):
  it = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def test_pipeline_erases_after_the_crop_and_resumes_exactly(digits_dir):
  plain = _batches(_config(digits_dir), 2)
  erased = _batches(_config(digits_dir, random_erase=1.0), 2)
  for a, b in zip(plain, erased):
    np.testing.assert_array_equal(a["label"], b["label"])
    for before, after in zip(a["image"], b["image"]):
      box = _changed_box(before, after)
      assert box is not None  # prob 1: every image has its rectangle ...
      top, left, h, w = box  # ... and the pixels outside it are the plain crop's.
      mask = np.ones(before.shape[:2], bool)
      mask[top:top + h, left:left + w] = False
      np.testing.assert_array_equal(before[mask], after[mask])

  cfg = _config(digits_dir, random_erase=0.5)
  it = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  it.close()
  assert state["pipeline"]["random_erase"] == 0.5
  for a, b in zip(_batches(cfg, 3, state=state), expected):
    np.testing.assert_array_equal(a["image"], b["image"])
  with pytest.raises(ValueError, match="random_erase"):  # Not into a plain pipeline.
    _batches(_config(digits_dir), 1, state=state)


def test_repeated_order_repeats_each_example_and_spreads_copies_over_processes():
  n, repeats = 30, 3
  order = pipeline._TrainOrder  # pylint: disable=protected-access
  alone = order(n, 5, 0, 1, repeats)
  epoch = [alone[i] for i in range(n)]
  assert [c for _, _, c in epoch] == [0, 1, 2] * 10
  examples = [g for _, g, _ in epoch]
  assert examples[::3] == examples[1::3] == examples[2::3]  # Three in a row ...
  assert len(set(examples)) == n // repeats  # ... so an epoch holds N / 3 distinct ones.
  assert alone[n][0] == 1 and [alone[n + i][1] for i in range(n)] != examples
  # Three processes: each sees the same examples in the same order, its own copy.
  per_process = [[order(n, 5, p, 3, repeats)[i] for i in range(n // 3)] for p in range(3)]
  for p, seq in enumerate(per_process):
    assert [g for _, g, _ in seq] == examples[::3] and {c for _, _, c in seq} == {p}
  # Off: today's order, (epoch, index) pairs of one permutation.
  plain = order(n, 5, 0, 1)
  assert sorted(plain[i][1] for i in range(n)) == list(range(n)) and len(plain[0]) == 2


def test_repeated_copies_are_augmented_independently(digits_dir):
  (batch,) = _batches(_config(digits_dir, repeated_aug=3), 1)
  images, labels = batch["image"].reshape(4, 3, 32, 32, 3), batch["label"].reshape(4, 3)
  assert (labels == labels[:, :1]).all()
  for copies in images:
    assert not np.array_equal(copies[0], copies[1])
    assert not np.array_equal(copies[1], copies[2])
  (plain,) = _batches(_config(digits_dir), 1)
  assert len(set(plain["label"].tolist())) > 4  # Without it, no such triples.


def test_bad_deit_fields_are_named():
  c = common.get_config()
  c.pp.random_erase, c.pp.repeated_aug = 1.5, 0
  lines = config_check.problems(c)
  assert any(line.startswith("config.pp.random_erase=1.5 must be in [0, 1]") for line in lines)
  assert any(line.startswith("config.pp.repeated_aug=0 must be a positive") for line in lines)


def test_magnitude_noise_varies_each_ops_magnitude_around_m():
  """Brightness scales by 0.1 + 1.8 * M / 10 (big_vision's range): read M back from it."""
  from vit_jax.data import randaugment  # pylint: disable=g-import-not-at-top
  image = np.full((8, 8, 3), 100, np.uint8)

  def magnitudes(augment):
    values = np.array([augment(image, np.random.default_rng(s))[0, 0, 0] for s in range(80)])
    return (values / 100 - 0.1) / 0.18

  fixed = magnitudes(randaugment.RandAugment(1, 9, ("Brightness",)))
  np.testing.assert_allclose(fixed, 9, atol=0.03)  # Rounding to uint8 only.
  noisy = magnitudes(randaugment.RandAugment(1, 9, ("Brightness",), magnitude_std=0.5))
  assert abs(noisy.mean() - 9) < 0.15 and 0.4 < noisy.std() < 0.6
  with pytest.raises(ValueError, match=r"config.pp.randaugment_magnitude_std=-1.0: .*"
                     r"magnitude_std must be a finite number >= 0"):
    pipeline.randaugment_from_config(fx.small_config(
        pp={"randaugment": (2, 9), "randaugment_magnitude_std": -1.0}))
