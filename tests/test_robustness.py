"""A workdir that survives its users (issue 13): every bad input the issue lists stops
before training with a message naming the field or file; resuming checks the config;
damaged checkpoints are moved aside and the run resumes bit-identically from the
previous one; SIGTERM at start-up exits 75 cleanly; no command prints a traceback."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from data_fixtures import write_image_folder
from trainer_fixtures import REPO, TINY_FLAGS, as_flags, compilation_cache, tiny_config
from vit_jax import checkpoints
from vit_jax import data
from vit_jax import main as main_command
from vit_jax.checkpoints.errors import CheckpointError
from vit_jax.models import params as names
from vit_jax.training import config_check
from vit_jax.training import config_history
from vit_jax.training import loop

TIMEOUT = 180


def _problems(**overrides):
  config = tiny_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_check.problems(config.copy_and_resolve_references())


# ------------------------------------------------------------------ the config check


def test_a_negative_learning_rate_stops_naming_the_field():
  lines = _problems(lr=-0.01)
  assert len(lines) == 1 and lines[0].startswith("config.lr=-0.01 must be > 0"), lines


@pytest.mark.parametrize("steps, line", [
    (dict(total_steps=0), "config.total_steps=0 must be positive."),
    (dict(warmup_steps=-1), "config.warmup_steps=-1 must be >= 0."),
    (dict(warmup_steps=2000), "config.warmup_steps=2000 must be in [0, total_steps=1000]."),
])
def test_a_bad_step_count_is_reported_once(steps, line):
  assert _problems(**steps) == [line]


@pytest.mark.parametrize("fields, start", [
    ({"pp.area_range": (0.9, 0.2)}, "config.pp.area_range=(0.9, 0.2) must be (low, high)"),
    ({"pp.area_range": (0.0, 1.0)}, "config.pp.area_range=(0.0, 1.0) must be (low, high)"),
    ({"model.num_heads": 5}, "config.model.hidden_size=32 is not divisible by "
                             "config.model.num_heads=5"),
    # Checked even with RandAugment off: a value that could never be right.
    ({"pp.randaugment_magnitude_std": -1.0}, "config.pp.randaugment_magnitude_std=-1.0"),
    ({"pp.randaugment": (2, 9), "pp.randaugment_magnitude_std": -1.0},
     "config.pp.randaugment=(2, 9), config.pp.randaugment_ops=None, "
     "config.pp.randaugment_magnitude_std=-1.0: RandAugment magnitude_std must be"),
])
def test_fields_that_failed_only_once_training_ran_are_checked_first(fields, start):
  lines = _problems(**fields)
  assert len(lines) == 1 and lines[0].startswith(start), lines


def test_every_out_of_range_field_is_listed_at_once():
  lines = _problems(**{"model.dropout_rate": 1.5, "model.attention_dropout_rate": -0.1,
                       "model.stochastic_depth": 1.0, "model.hidden_size": 0,
                       "momentum": 1.0, "weight_decay": -1.0, "num_classes": 1})
  text = "\n".join(lines)
  for field in ("model.dropout_rate=1.5", "model.attention_dropout_rate=-0.1",
                "model.stochastic_depth=1.0", "model.hidden_size=0", "momentum=1.0",
                "weight_decay=-1.0", "num_classes=1"):
    assert f"config.{field}" in text, (field, text)
  assert len(lines) == 7, lines
  label = tiny_config(label_smoothing=1.0)
  assert any("config.label_smoothing=1.0 must be in [0, 1)" in line
             for line in config_check.problems(label))


def test_model_name_rule():
  lines = _problems(**{"model.name": "ViT-X_99"})
  assert len(lines) == 1 and "config.model.name='ViT-X_99' is shaped like a registered" \
      in lines[0], lines
  assert "Did you mean ViT-B_16" in _problems(**{"model.name": "ViT-B_17"})[0]
  assert _problems(**{"model.name": "R50+ViT-Q_16"})  # Hybrid-shaped, not registered.
  # The default job's free label, any other label, and a registered name whose fields
  # are overridden (the README's --config.model.patch_size=32 on ViT-B_16) are fine.
  for name in ("ViT-digits_4", "my-vit", "ViT-B_16", "ViT-B_16-gap-norep", "testing"):
    assert _problems(**{"model.name": name}) == [], name


def test_patches_must_tile_the_image():
  lines = _problems(**{"model.patch_size": 5})
  assert lines == ["config.model.image_size=16 (config.pp.crop) is not a multiple of "
                   "config.model.patch_size=5."]


def test_a_head_smaller_than_the_classes_stops_a_larger_one_warns():
  config = tiny_config(num_classes=5)
  info = data.get_info(config)
  assert info.num_classes == 10
  [line] = config_check.class_problems(config, info)
  assert line.startswith("config.num_classes=5 is smaller than the 10 classes of digits")
  config.num_classes = 12
  assert config_check.class_problems(config, info) == []
  assert "extra 2 logits" in config_check.class_warnings(config, info)[0]


def _folder(root, train, test):
  write_image_folder(root)
  for split, keep in (("train", train), ("test", test)):
    for cls in ("red", "blue", "gray"):
      if cls not in keep:
        shutil.rmtree(os.path.join(root, split, cls))
  return root


def test_a_single_class_folder_stops(tmp_path):
  root = _folder(str(tmp_path / "shapes"), train=("red",), test=("red",))
  config = tiny_config(dataset=root, data_dir=str(tmp_path / "tfds"))
  lines = config_check.class_problems(config, data.get_info(config))
  assert len(lines) == 1 and "the train split 'train' has 1 class folder(s) (red)" in lines[0]


def test_an_eval_class_unknown_to_training_is_named(tmp_path):
  root = _folder(str(tmp_path / "shapes"), train=("red", "blue"), test=("red", "blue", "gray"))
  config = tiny_config(dataset=root, data_dir=str(tmp_path / "tfds"))
  lines = config_check.class_problems(config, data.get_info(config))
  assert len(lines) == 1 and "has class(es) the train split 'train' lacks: gray" in lines[0]


def test_unusable_workdirs_are_named(tmp_path, monkeypatch):
  afile = tmp_path / "a_file"
  afile.write_text("x")
  [line] = config_check.workdir_problems(str(afile))
  assert f"{afile} exists and is not a directory" in line
  [line] = config_check.workdir_problems(str(afile / "run"))
  assert f"{afile} is a file" in line
  assert config_check.workdir_problems(str(tmp_path / "new" / "run")) == []
  # Not writable (as root os.access says yes to everything, so ask it to say no).
  locked = tmp_path / "locked"
  locked.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(locked)
                      else real_access(p, m))
  [line] = config_check.workdir_problems(str(locked / "run"))
  assert f"its parent {locked} is not writable" in line


# ------------------------------------------------------------------ resume config


def _saved(config):
  return config_history.as_json(config)


def test_resume_refuses_fixed_fields_and_lists_them():
  saved = _saved(tiny_config())
  new = tiny_config(batch_size=48, seed=3)
  new.model.hidden_size = 64
  with pytest.raises(config_history.ConfigChangeError) as e:
    config_history.check_resume(saved, new, "/w")
  text = str(e.value)
  assert "batch_size: 64 -> 48" in text and "model.hidden_size: 32 -> 64" in text
  assert "seed: 0 -> 3" in text and "new --workdir" in text
  assert "--config.allow_config_change=batch_size,model.hidden_size,seed" in text
  new.allow_config_change = "batch_size,model,seed"  # A group name allows its fields.
  changes = config_history.check_resume(saved, new, "/w")
  assert changes == {"batch_size": (64, 48), "model.hidden_size": (32, 64), "seed": (0, 3)}


def test_resume_allows_schedule_and_cadence_with_a_line():
  saved = _saved(tiny_config())
  new = tiny_config(lr=0.02, total_steps=2000, eval_every=10, data_workers=4,
                    progress_bar=True)
  changes = config_history.check_resume(saved, new, "/w")
  assert changes == {"eval_every": (250, 10), "lr": (0.01, 0.02),
                     "total_steps": (1000, 2000)}  # Machine fields are not compared.
  assert config_history.describe_changes(changes) == (
      "Resuming with a changed config: eval_every: 250 -> 10, lr: 0.01 -> 0.02, "
      "total_steps: 1000 -> 2000.")


def test_none_of_the_checkpoints_restores_lists_every_step(tmp_path):
  tree = {"w": jax.numpy.arange(4.0)}
  with checkpoints.TrainCheckpointer(tmp_path / "ck", async_save=False) as ck:
    for step in (1, 2):
      ck.save(step, tree)
  # Orbax needs neither the tree metadata nor the step's metadata given a target tree:
  # those deleted, step 2 still restores, as it was.
  os.remove(tmp_path / "ck" / "2" / "state" / "_METADATA")
  os.remove(tmp_path / "ck" / "2" / "_CHECKPOINT_METADATA")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                         sharding=a.sharding), tree)
  with checkpoints.TrainCheckpointer(tmp_path / "ck") as ck:
    state, _, step = ck.restore_newest(abstract)
  assert step == 2 and state["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
  # The array store's own metadata (OCDBT manifest) gone: neither step restores.
  for step in (1, 2):
    os.remove(tmp_path / "ck" / str(step) / "state" / "manifest.ocdbt")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                         sharding=a.sharding), tree)
  with checkpoints.TrainCheckpointer(tmp_path / "ck") as ck:
    with pytest.raises(CheckpointError, match=r"(?s)No checkpoint in .* can be restored; "
                       r"tried \(newest first\):\n  step 2: .*\n  step 1: "):
      ck.restore_newest(abstract)
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]  # Nothing moved.


# ------------------------------------------------------------- runs in this process

STEPS = 30
RUN = dict(total_steps=STEPS, log_every=10, eval_every=0, checkpoint_every=10,
           batch_size=32, keep_checkpoints=3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: checkpoints 10, 20, 30 and its final parameters."""
  with compilation_cache(str(tmp_path_factory.mktemp("xla_cache"))):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    loop.train_and_evaluate(tiny_config(**RUN), workdir)
    yield workdir


def _array_files(step_dir):
  return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


def _truncate(step_dir):
  """Every array data file cut to half its size.

  Which file holds an array is not knowable from outside: Orbax merges the per-process
  OCDBT databases into the step's own and may leave data files that the merged manifest
  no longer reads, so cutting one chosen file (say the largest) can miss the data.
  """
  files = _array_files(step_dir)
  assert files, step_dir
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


def _delete_metadata(step_dir):
  """The array store's metadata (the OCDBT manifest naming where each array is)."""
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _half_written(step_dir):
  """A save killed mid-write: the step still under Orbax's temporary name, a file cut."""
  _truncate(step_dir)
  os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp-1700000000")


def _assert_identical(a, b):
  flat_a, flat_b = names.flatten(a), names.flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


@pytest.mark.parametrize("damage", [_truncate, _delete_metadata, _half_written],
                         ids=["truncated_array", "deleted_metadata", "half_written_tmp"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous(reference, tmp_path, damage,
                                                               capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "params"))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  damage(os.path.join(ckpt_dir, str(STEPS)))
  capsys.readouterr()
  summary = loop.train_and_evaluate(tiny_config(**RUN), workdir)
  out = capsys.readouterr().out
  assert "Resumed from the checkpoint at step 20 " in out, out
  assert summary["step"] == STEPS
  if damage is _half_written:
    assert "cannot be restored" not in out  # Orbax never listed it (and removed it).
  else:
    assert f"The checkpoint at step {STEPS} cannot be restored (" in out, out
    [aside] = glob.glob(os.path.join(ckpt_dir, f"{STEPS}.damaged-*"))
    assert os.path.isdir(os.path.join(aside, "state"))  # Kept, not deleted.
  assert os.path.isdir(os.path.join(ckpt_dir, str(STEPS)))  # Saved again, cleanly.
  _assert_identical(checkpoints.restore_params(os.path.join(workdir, "params")),
                    checkpoints.restore_params(os.path.join(reference, "params")))


def test_resume_with_a_changed_config(reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  metrics_before = open(os.path.join(workdir, "metrics.jsonl")).read()
  # A fixed field: refused before anything is written (the hidden_size crash).
  changed = tiny_config(**RUN)
  changed.model.hidden_size = 48
  with pytest.raises(config_history.ConfigChangeError, match=r"model.hidden_size: 32 -> 48"):
    loop.train_and_evaluate(changed, workdir)
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics_before
  assert not os.path.exists(os.path.join(workdir, "lock.json"))
  # Allowed fields: a line says what changed; the history keeps both configs.
  capsys.readouterr()
  loop.train_and_evaluate(tiny_config(**dict(RUN, lr=0.02, total_steps=STEPS + 10)), workdir)
  out = capsys.readouterr().out
  assert "Resuming with a changed config: lr: 0.01 -> 0.02, total_steps: 30 -> 40." in out
  history = config_history.read(workdir)
  assert [(h["step"], h["config"]["lr"]) for h in history] == [(0, 0.01), (30, 0.02)]
  assert history[1]["changes"] == {"lr": [0.01, 0.02], "total_steps": [30, 40]}


# ------------------------------------------------------------------ the commands


def _env(**extra):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  env.pop("VIT_JAX_TRACEBACK", None)
  env.update(extra)
  return env


def _command(module, args, **env):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_env(**env),
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _main_popen(workdir, flags):
  return subprocess.Popen([sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}",
                           *as_flags(flags)], cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_preempted_exit_code_is_one_number():
  sys.path.insert(0, os.path.join(REPO, "launch"))
  import tpu  # pylint: disable=g-import-not-at-top
  assert loop.PREEMPTED_EXIT_CODE == main_command.PREEMPTED_EXIT_CODE == \
      tpu.PREEMPTED_EXIT_CODE == 75
  assert '"$status" -eq 75' in open(os.path.join(REPO, "launch", "slurm.sh")).read()


def test_input_errors_give_one_message_and_the_traceback_on_request(tmp_path):
  afile = tmp_path / "a_file"
  afile.write_text("x")
  result = _command("vit_jax.main", [f"--workdir={afile}"])
  assert result.returncode == 1
  assert f"Error: --workdir={afile}: {afile} exists and is not a directory" in result.stderr
  assert "Traceback" not in result.stderr
  result = _command("vit_jax.main", [f"--workdir={tmp_path / 'w'}", "--config.lr=-0.01"],
                    VIT_JAX_TRACEBACK="1")
  assert result.returncode == 1 and "Traceback" in result.stderr
  assert "Error: config.lr=-0.01 must be > 0" in result.stderr
  assert not (tmp_path / "w").exists()  # Stopped before anything was written.
  for module, args, expected in [
      ("vit_jax.convert", [str(tmp_path / "missing.npz"), str(tmp_path / "out")],
       "missing.npz"),
      ("vit_jax.summary", ["ViT-X_99"], "Unknown model name 'ViT-X_99'"),
      ("vit_jax.analyze", [f"--workdir={tmp_path}"], "config.json not found"),
      ("vit_jax.prepare", ["no_such_dataset_xyz", "--data_dir", str(tmp_path)],
       "no_such_dataset_xyz")]:
    result = _command(module, args)
    assert result.returncode != 0, (module, result.stdout)
    assert "Traceback" not in result.stderr, (module, result.stderr[-2000:])
    assert result.stderr.count("Error: ") == 1 and expected in result.stderr, \
        (module, result.stderr[-2000:])


def _read_until(proc, text, seen):
  deadline = time.monotonic() + TIMEOUT
  for line in proc.stdout:
    seen.append(line)
    if text in line or time.monotonic() > deadline:
      return
  raise AssertionError("".join(seen)[-3000:])


def test_sigterm_during_start_up_exits_75_without_saving(tmp_path):
  workdir = tmp_path / "run"
  proc = _main_popen(workdir, dict(TINY_FLAGS, total_steps=20, checkpoint_every=5))
  seen = []
  _read_until(proc, "Config ", seen)  # main has started: the handler is in place.
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=TIMEOUT)
  out = "".join(seen) + out
  assert proc.returncode == 75, out[-3000:]
  assert "Preemption (SIGTERM)" in out and "Traceback" not in out, out[-3000:]
  steps = [n for n in os.listdir(workdir / "checkpoints")] if (
      workdir / "checkpoints").exists() else []
  assert not [n for n in steps if n.isdigit()]  # Nothing saved.


def test_a_second_run_on_a_live_workdir_is_refused(tmp_path):
  workdir = tmp_path / "run"
  flags = dict(TINY_FLAGS, total_steps=100_000, checkpoint_every=1000, log_every=1)
  first, second = _main_popen(workdir, flags), _main_popen(workdir, flags)
  try:
    deadline = time.monotonic() + TIMEOUT
    while first.poll() is None and second.poll() is None:
      assert time.monotonic() < deadline, "neither run was refused"
      time.sleep(0.2)
    loser, winner = (first, second) if first.poll() is not None else (second, first)
    out = loser.communicate(timeout=TIMEOUT)[0]
    assert loser.returncode == 1, out[-3000:]
    assert f"is in use by another run (host {os.uname().nodename}, pid {winner.pid}, " \
        f"started " in out, out[-3000:]
    assert "Traceback" not in out
    # The winner trains on; SIGTERM preempts it: a checkpoint, then exit status 75.
    seen = []
    _read_until(winner, "step ", seen)
    winner.send_signal(signal.SIGTERM)
    out = "".join(seen) + winner.communicate(timeout=TIMEOUT)[0]
    assert winner.returncode == 75, out[-3000:]
    assert "Preemption (SIGTERM): saving a checkpoint at step" in out
    assert not (workdir / "lock.json").exists()  # Released on the way out.
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 100_000
  finally:
    for proc in (first, second):
      if proc.poll() is None:
        proc.kill()
