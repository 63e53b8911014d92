"""vit_jax.load / predict / export on a real tiny run: answers equal the trainer's eval.

One short digits run (module fixture) is loaded as a workdir, as Orbax params and as a
.npz, exported once with jax.export, and asked about the digits test split written as PNG
files; every bad input of the issue gets its message and exit status.
"""

import json
import os
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
from jax import export as jax_export

import vit_jax
from trainer_fixtures import tiny_config
from vit_jax import checkpoints
from vit_jax import export as export_cmd
from vit_jax import predict as predict_cmd
from vit_jax.data import digits as digits_lib
from vit_jax.inference import LoadError
from vit_jax.inference import exporting
from vit_jax.training import loop
from vit_jax.training import workdir as workdir_lib

STEPS = 60
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(summary, workdir) of a 60-step tiny run on digits (evaluated at the end)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(total_steps=STEPS, eval_every=0, checkpoint_every=STEPS, log_every=20)
  return loop.train_and_evaluate(config, workdir), workdir


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory):
  """(directory, labels, images): the digits test split as PNGs, encoded as the dataset is."""
  images, labels = digits_lib.digits_splits()["test"]
  root = tmp_path_factory.mktemp("pngs")
  for i, (image, label) in enumerate(zip(images, labels)):
    ok, png = cv2.imencode(".png", image)
    assert ok
    (root / f"{i:03d}_{label}.png").write_bytes(png.tobytes())
  return str(root), labels, images


@pytest.fixture(scope="module")
def artifact(run, tmp_path_factory):
  """One export of the run, through the command."""
  out = str(tmp_path_factory.mktemp("export") / "artifact")
  assert export_cmd.main([f"--checkpoint={run[1]}", f"--output={out}"]) == 0
  return out


def _predict(capsys, *argv):
  """(exit status, stdout lines, stderr) of the predict command run in-process."""
  status = predict_cmd.main(list(argv))
  captured = capsys.readouterr()
  return status, captured.out.splitlines(), captured.err


def _rgb(images):
  return [np.repeat(img[..., None], 3, axis=-1) for img in images]


def _reference_probs(predictor, images_16px_uint8):
  """softmax(model(x / 127.5 - 1)), written from the definitions."""
  x = np.asarray(images_16px_uint8, np.float32) / 127.5 - 1.0
  logits = predictor.model.apply({"params": predictor.params}, x, train=False)
  return np.asarray(jax.nn.softmax(logits, axis=-1))


# ----------------------------------------------------------------- answers and sources


def test_predict_agrees_with_the_trainers_eval(run, test_pngs, capsys):
  summary, workdir = run
  directory, labels, _ = test_pngs
  status, lines, err = _predict(capsys, f"--checkpoint={workdir}", "--json", "--top_k=3",
                                directory)
  assert status == 0, err
  records = [json.loads(line) for line in lines]
  assert len(records) == 360 == len(labels)
  assert [os.path.basename(r["path"]) for r in records] == sorted(os.listdir(directory))
  truth = [int(os.path.basename(r["path"]).split("_")[1][0]) for r in records]
  top1 = [int(r["top_k"][0]["label"]) for r in records]  # labels.txt names: '0'..'9'
  assert [r["top_k"][0]["index"] for r in records] == top1
  correct = sum(p == t for p, t in zip(top1, truth))
  assert correct == round(summary["accuracy"] * 360), (correct, summary["accuracy"])
  assert all(len(r["top_k"]) == 3 and r["top_k"][0]["prob"] >= r["top_k"][1]["prob"]
             for r in records)
  assert "360 image(s) predicted, 0 input(s) failed" in err


def test_text_output_names_path_and_top_k(run, test_pngs, capsys):
  directory, _, _ = test_pngs
  first = os.path.join(directory, sorted(os.listdir(directory))[0])
  status, lines, _ = _predict(capsys, f"--checkpoint={run[1]}", "--top_k=2", first)
  assert status == 0 and len(lines) == 1
  path, answers = lines[0].split(": ")
  assert path == first and len(answers.split(", ")) == 2


def test_workdir_orbax_and_npz_give_identical_probabilities(run, test_pngs, tmp_path):
  _, workdir = run
  _, _, images = test_pngs
  from_workdir = vit_jax.load(workdir)
  params_dir = os.path.join(workdir, workdir_lib.PARAMS_DIR)
  from_orbax = vit_jax.load(params_dir, model="testing")
  npz = str(tmp_path / "digits.npz")
  checkpoints.save_npz(npz, checkpoints.restore_params(params_dir))
  from_npz = vit_jax.load(npz, model="testing")
  batch = _rgb(images[:40])
  expected = from_workdir(batch)
  assert expected.shape == (40, 10)
  np.testing.assert_array_equal(from_orbax(batch), expected)
  np.testing.assert_array_equal(from_npz(batch), expected)
  # Orbax params inside a workdir, without a model name: the workdir's config and labels.
  inside = vit_jax.load(params_dir)
  np.testing.assert_array_equal(inside(batch), expected)
  assert inside.class_names == tuple(str(i) for i in range(10))
  assert from_npz.class_names == tuple(str(i) for i in range(10)) and from_npz.notes
  assert from_workdir.image_size == from_npz.image_size == 16  # 17 posemb tokens, patch 4.


def test_probabilities_equal_the_model_on_eval_resized_images(run, test_pngs):
  predictor = vit_jax.load(run[1], batch_size=8)
  _, _, images = test_pngs
  rgb = _rgb(images[:11])
  resized = [cv2.resize(img, (16, 16), interpolation=cv2.INTER_LINEAR) for img in rgb]
  probs = predictor(rgb)
  np.testing.assert_allclose(probs, _reference_probs(predictor, resized), atol=1e-6)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
  assert predictor.output == "softmax"


def test_any_size_uint8_or_float_list_or_batch(run, test_pngs):
  predictor = vit_jax.load(run[1], batch_size=4)
  _, _, images = test_pngs
  rgb = _rgb(images[:6])
  as_uint8 = predictor(np.stack(rgb))
  np.testing.assert_array_equal(predictor(rgb), as_uint8)
  np.testing.assert_array_equal(predictor([img / 255.0 for img in rgb]), as_uint8)
  np.testing.assert_array_equal(predictor(images[:6]), as_uint8)  # grayscale [n, 8, 8]
  mixed = [cv2.resize(rgb[0], (37, 23)), rgb[1], cv2.resize(rgb[2], (200, 120))]
  np.testing.assert_array_equal(
      predictor(mixed), predictor.predict_preprocessed(np.stack(
          [cv2.resize(mixed[0], (16, 16)), cv2.resize(rgb[1], (16, 16)),
           cv2.resize(mixed[2], (16, 16), interpolation=cv2.INTER_AREA)])))
  with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
    predictor([rgb[0].astype(np.float32)])


def test_one_compile_for_every_number_of_images(run, test_pngs):
  predictor = vit_jax.load(run[1], batch_size=8)
  _, _, images = test_pngs
  for n in (1, 3, 8, 13, 30):
    assert predictor(images[:n]).shape == (n, 10)
  assert predictor._jitted._cache_size() == 1  # pylint: disable=protected-access


def test_sigmoid_trained_runs_give_per_class_sigmoids(run, tmp_path, test_pngs):
  _, workdir = run
  copy = _copy_workdir(workdir, tmp_path, loss="sigmoid_xent")
  predictor = vit_jax.load(copy)
  assert predictor.output == "sigmoid"
  _, _, images = test_pngs
  rgb = _rgb(images[:4])
  x = np.stack([cv2.resize(i, (16, 16)) for i in rgb]).astype(np.float32) / 127.5 - 1
  logits = predictor.model.apply({"params": predictor.params}, x, train=False)
  np.testing.assert_allclose(predictor(rgb), 1 / (1 + np.exp(-np.asarray(logits))),
                             atol=1e-6)


def _copy_workdir(workdir, tmp_path, keep_labels=True, **config_changes):
  copy = str(tmp_path / "copy")
  os.makedirs(copy)
  shutil.copytree(os.path.join(workdir, "params"), os.path.join(copy, "params"))
  if keep_labels:
    shutil.copy(os.path.join(workdir, "labels.txt"), copy)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config.update(config_changes)
  with open(os.path.join(copy, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return copy


def test_class_names_from_labels_txt_dataset_or_indices(run, tmp_path):
  _, workdir = run
  with open(os.path.join(workdir, "labels.txt"), encoding="utf-8") as f:
    assert f.read() == "".join(f"{i}\n" for i in range(10))  # Written by the trainer.
  from_dataset = vit_jax.load(_copy_workdir(workdir, tmp_path / "a", keep_labels=False))
  assert from_dataset.class_names == tuple(str(i) for i in range(10))
  assert not from_dataset.notes
  gone = _copy_workdir(workdir, tmp_path / "b", keep_labels=False,
                       dataset=str(tmp_path / "no_such_folder"))
  from_indices = vit_jax.load(gone)
  assert from_indices.class_names == tuple(str(i) for i in range(10))
  assert any("cannot be read here" in n for n in from_indices.notes)
  labels = tmp_path / "names.txt"
  labels.write_text("".join(f"digit {i}\n" for i in range(10)) + "\n\n")
  named = vit_jax.load(gone, labels=str(labels))
  assert named.class_names[3] == "digit 3"


# ------------------------------------------------------------------------- export


def test_export_equals_flax_for_batch_sizes_1_3_8(run, artifact, test_pngs):
  flax_predictor = vit_jax.load(run[1])
  _, _, images = test_pngs
  batch = flax_predictor.preprocess(_rgb(images[:8]))
  with open(os.path.join(artifact, exporting.PROGRAM_FILE), "rb") as f:
    program = jax_export.deserialize(bytearray(f.read()))
  assert str(program.in_avals[-1].shape[0]) == "batch"  # Symbolic: one program, any batch.
  with np.load(os.path.join(artifact, exporting.PARAMS_FILE)) as npz:
    params = {k: npz[k] for k in npz.files}
  expected = flax_predictor.predict_preprocessed(batch)
  for size in (1, 3, 8):
    direct = np.asarray(program.call(params, batch[:size]))
    np.testing.assert_allclose(direct, expected[:size], rtol=1e-5, atol=1e-6)
    loaded = vit_jax.load(artifact, batch_size=size)
    np.testing.assert_allclose(loaded(_rgb(images[:8])), expected, rtol=1e-5, atol=1e-6)
    assert loaded.model is None


def test_export_metadata(artifact):
  with open(os.path.join(artifact, exporting.SERVING_JSON), encoding="utf-8") as f:
    metadata = json.load(f)
  assert metadata["image_size"] == 16 and metadata["num_classes"] == 10
  assert metadata["class_names"] == [str(i) for i in range(10)]
  assert metadata["model"] == "ViT-digits_4" and metadata["output"] == "softmax"
  assert "cpu" in metadata["platforms"]


def test_export_loads_without_flax_or_the_model_code(artifact):
  script = (
      "import sys, numpy as np, vit_jax\n"
      "assert 'jax' not in sys.modules, 'import vit_jax is not light'\n"
      f"p = vit_jax.load({artifact!r})\n"
      "probs = p([np.zeros((20, 30, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)])\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'flax'\n"
      "             or m.startswith(('vit_jax.models', 'vit_jax.checkpoints')))\n"
      "print(probs.shape, bad)\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "(2, 10) []"


def test_predict_from_the_artifact_matches_the_workdir(run, artifact, test_pngs, capsys):
  directory, _, _ = test_pngs
  _, from_export, _ = _predict(capsys, f"--checkpoint={artifact}", "--json", directory)
  _, from_workdir, _ = _predict(capsys, f"--checkpoint={run[1]}", "--json", directory)
  top = lambda lines: [json.loads(l)["top_k"][0]["index"] for l in lines]
  assert len(from_export) == 360 and top(from_export) == top(from_workdir)


def test_export_refuses_a_directory_with_other_files(run, tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("mine")
  assert export_cmd.main([f"--checkpoint={run[1]}", f"--output={tmp_path}"]) == 1
  assert "already holds other files (notes.txt)" in capsys.readouterr().err


# --------------------------------------------------------------------- bad input


def test_checkpoint_without_a_head(run, tmp_path, capsys):
  params = checkpoints.restore_params(os.path.join(run[1], "params"))
  del params["head"]
  encoder = str(tmp_path / "encoder")
  checkpoints.save_params(encoder, params)
  status, lines, err = _predict(capsys, f"--checkpoint={encoder}", "--model=testing", "x.png")
  assert status == 1 and not lines
  assert err.startswith(f"Error: Orbax directory {encoder} has no classification head")
  assert "Traceback" not in err
  mpp = _copy_workdir(run[1], tmp_path, objective="mpp")
  with pytest.raises(LoadError, match=r"config.objective='mpp'.*no classification head"):
    vit_jax.load(mpp)


@pytest.mark.parametrize("kind", ["text file", "empty directory", "missing"])
def test_a_path_of_no_accepted_kind(tmp_path, capsys, kind):
  path = tmp_path / "thing"
  if kind == "text file":
    path.write_text("hello")
  elif kind == "empty directory":
    path.mkdir()
  status, _, err = _predict(capsys, f"--checkpoint={path}", "x.png")
  assert status == 1 and "Traceback" not in err
  expected = "does not exist" if kind == "missing" else "of none of the accepted kinds"
  assert err.startswith(f"Error: {path}") and expected in err, err


def test_npz_without_model(run, tmp_path, capsys):
  npz = str(tmp_path / "w.npz")
  checkpoints.save_npz(npz, checkpoints.restore_params(os.path.join(run[1], "params")))
  status, _, err = _predict(capsys, f"--checkpoint={npz}", "x.png")
  assert status == 1
  assert err.startswith(f"Error: .npz file {npz} holds only arrays: name its model with "
                        "--model=NAME")
  status, _, err = _predict(capsys, f"--checkpoint={npz}", "--model=ViT-Ti_16", "x.png")
  assert status == 1 and "does not fit the model ViT-Ti_16" in err
  status, _, err = _predict(capsys, f"--checkpoint={npz}", "--model=ViT-X", "x.png")
  assert status == 1 and "Unknown model name 'ViT-X'" in err


def test_labels_file_with_the_wrong_number_of_lines(run, tmp_path, capsys):
  labels = tmp_path / "labels.txt"
  labels.write_text("".join(f"c{i}\n" for i in range(9)))
  status, _, err = _predict(capsys, f"--checkpoint={run[1]}", f"--labels={labels}", "x.png")
  assert status == 1
  assert err == (f"Error: Labels file {labels} has 9 lines but the model's head has 10 "
                 "classes; give exactly one name per class, in class index order.\n")


def test_unreadable_and_empty_images_are_named_and_the_rest_predicted(
    run, test_pngs, tmp_path, capsys):
  source, _, _ = test_pngs
  folder = tmp_path / "mixed"
  (folder / "sub").mkdir(parents=True)
  good = sorted(os.listdir(source))[:3]
  for name in good:
    shutil.copy(os.path.join(source, name), folder / "sub" / name)
  (folder / "empty.png").write_bytes(b"")
  (folder / "garbage.jpg").write_bytes(b"this is not a jpeg")
  os.symlink(tmp_path / "nowhere.png", folder / "dangling.png")
  (folder / "readme.txt").write_text("not an image: skipped by the walk")
  missing = tmp_path / "missing.png"
  status, lines, err = _predict(capsys, f"--checkpoint={run[1]}", str(folder), str(missing))
  assert status == 1
  assert [line.split(": ")[0] for line in lines] == [str(folder / "sub" / n) for n in good]
  assert f"Error: {folder / 'empty.png'}: the file is empty (0 bytes)." in err
  assert f"Error: {folder / 'garbage.jpg'}: not a decodable image (18 bytes" in err
  assert f"Error: {folder / 'dangling.png'}: cannot read the file" in err
  assert f"Error: {missing}: no such file or directory." in err
  assert "3 image(s) predicted, 4 input(s) failed" in err and "Traceback" not in err
  status, lines, _ = _predict(capsys, f"--checkpoint={run[1]}", str(folder / "sub"))
  assert status == 0 and len(lines) == 3
