"""RandAugment in the grain pipeline, and the decode check of `prepare` (issue 14)."""

import json
import os

import numpy as np
import pytest

import data_fixtures as fx
from vit_jax import data
from vit_jax import prepare as prepare_cmd
from vit_jax.data import pipeline
from vit_jax.data import preparation
from vit_jax.data import randaugment


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_digits"))


def _batches(cfg, n, seed=3, state=None):
  it = data.make_train_iterator(cfg, seed=seed, process_index=0, process_count=1)
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _config(digits_dir, ra=None, ops=None):
  return fx.small_config(data_dir=digits_dir, batch_size=16, pp={
      "randaugment": ra, "randaugment_ops": ops, "area_range": (0.5, 1.0)})


def test_randaugment_runs_after_the_crop_on_the_same_generator(digits_dir):
  plain = _batches(_config(digits_dir), 2)
  # Rotate at M = 0 is the identity: the crop and flip (drawn first) are unchanged.
  zero = _batches(_config(digits_dir, (2, 0), ("Rotate",)), 2)
  for a, b in zip(plain, zero):
    np.testing.assert_array_equal(a["image"], b["image"])
  # Invert has no magnitude: with one op every image is 255 - the plain one.
  inverted = _batches(_config(digits_dir, (1, 10), ("Invert",)), 2)
  for a, b in zip(plain, inverted):
    np.testing.assert_array_equal(b["image"], 255 - a["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_randaugment_batches_are_seeded_and_resume_exactly(digits_dir):
  cfg = _config(digits_dir, (2, 15))
  first, again = _batches(cfg, 3), _batches(cfg, 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  plain = _batches(_config(digits_dir), 3)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, plain))
  other_seed = _batches(cfg, 3, seed=4)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other_seed))

  it = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  [next(it) for _ in range(2)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  it.close()
  assert state["pipeline"]["randaugment"] == [2, 15.0, list(randaugment.DEFAULT_OPS)]
  for a, b in zip(_batches(cfg, 4, state=state), expected):
    np.testing.assert_array_equal(a["image"], b["image"])
  # A state saved without RandAugment (as before it existed) does not restore into one.
  plain_state = data.make_train_iterator(_config(digits_dir), seed=3, process_index=0,
                                         process_count=1)
  with pytest.raises(ValueError, match="randaugment"):
    _batches(cfg, 1, state=plain_state.get_state())
  assert "randaugment" not in plain_state.get_state()["pipeline"]
  plain_state.close()


@pytest.mark.parametrize("ra, ops, message", [
    ((2, 31), None, r"magnitude must be a number in \[0, 30\]"),
    ((2, -1), None, r"magnitude must be a number in \[0, 30\]"),
    ((-1, 10), None, "num_ops must be an integer >= 0"),
    ((2, 10), ("Rotate", "Blur"), r"Unknown RandAugment op\(s\) \['Blur'\]"),
    ((2,), None, r"must be \(num_ops, magnitude\)"),
])
def test_bad_randaugment_settings_name_the_field(ra, ops, message):
  cfg = fx.small_config(pp={"randaugment": ra, "randaugment_ops": ops})
  with pytest.raises(ValueError, match=message) as e:
    pipeline.randaugment_from_config(cfg)
  assert "config.pp.randaugment" in str(e.value)


# ------------------------------------------------------------------ prepare's decode check
def _folder_with_bad_files(tmp_path):
  root = tmp_path / "photos"
  fx.write_image_folder(str(root))
  good = (root / "train" / "red" / "a.jpg").read_bytes()
  truncated = root / "train" / "red" / "truncated.jpg"
  truncated.write_bytes(good[:len(good) // 3])
  text = root / "test" / "blue" / "readme.png"
  text.write_text("this is a text file, not a PNG")
  return root, {str(truncated), str(text)}


def test_truncated_jpeg_is_undecodable():
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(fx._rgb(fx.RED, 64, 64)).save(buf, format="JPEG", quality=95)
  whole = buf.getvalue()
  assert preparation.undecodable([("whole", whole), ("cut", whole[:len(whole) // 3])]) == ["cut"]


def test_prepare_reports_every_undecodable_file_at_once(tmp_path, capsys):
  root, bad = _folder_with_bad_files(tmp_path)
  out = str(tmp_path / "tfds")
  with pytest.raises(preparation.UndecodableImagesError) as e:
    preparation.prepare(str(root), out)
  assert set(e.value.paths) == bad
  message = str(e.value)
  assert "2 of 16 images" in message and "--skip_corrupt" in message
  assert all(p in message for p in bad)
  # Nothing was written, so training does not silently use a partial copy.
  cfg = fx.small_config(dataset=str(root), data_dir=out)
  assert not os.path.exists(os.path.join(
      data.sources.folder_lib.prepared_dir(str(root), out), "dataset_info.json"))
  # The command prints the same message and fails.
  assert prepare_cmd.main([str(root), "--data_dir", out]) == 2
  err = capsys.readouterr().err
  assert "truncated.jpg" in err and "readme.png" in err
  del cfg


def test_prepare_skip_corrupt_leaves_them_out(tmp_path, capsys):
  root, _ = _folder_with_bad_files(tmp_path)
  out = str(tmp_path / "tfds")
  assert prepare_cmd.main([str(root), "--data_dir", out, "--skip_corrupt"]) == 0
  assert "Skipped 2 undecodable image(s)" in capsys.readouterr().out
  cfg = fx.small_config(dataset=str(root), data_dir=out, batch_size=7, eval_batch_size=7)
  info = data.get_info(cfg)
  assert info.num_examples == {"train": 7, "test": 7}  # 8 files each, 1 bad left out.
  batch = next(iter(data.make_eval_iterator(cfg, process_index=0, process_count=1)))
  assert batch["mask"].all()  # Training reads the prepared copy: no corrupt image left.


def test_prepared_tfds_dataset_is_decoded_and_remembered(tmp_path, digits_dir):
  path = preparation.prepare("digits", str(tmp_path))
  with open(os.path.join(path, preparation.DECODE_CHECK_FILE)) as f:
    assert json.load(f) == {"undecodable": [], "total": 1797}
