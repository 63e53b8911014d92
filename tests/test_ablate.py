"""`python -m vit_jax.ablate`: a grid of real tiny runs, tabulated from their metrics, resumable."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from trainer_fixtures import REPO, compilation_cache, tiny_config
from vit_jax.evaluate import ablation
from vit_jax.training import loop

STEPS = 10
SEEDS = (0, 1)


def _config():
  config = tiny_config(total_steps=STEPS, eval_every=0, checkpoint_every=STEPS,
                       keep_checkpoints=1)
  config.lock()
  return config


def _final_eval_accuracy(run_workdir):
  """The last eval record's accuracy, read straight from metrics.jsonl."""
  with open(os.path.join(run_workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in records if r.get("kind") == "eval"]
  assert evals[-1]["step"] == STEPS
  return evals[-1]["accuracy"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  """posemb learn vs sincos2d x 2 seeds, trained once for the module's tests."""
  config = _config()
  sweeps = [ablation.parse_sweep("model.posemb=learn,sincos2d", config)]
  workdir = str(tmp_path_factory.mktemp("ablation"))
  calls = []

  def train(cfg, run_workdir):
    calls.append((cfg.model.posemb, cfg.seed, run_workdir))
    return loop.train_and_evaluate(cfg, run_workdir)

  with compilation_cache(str(tmp_path_factory.mktemp("xla_cache"))):
    trained = ablation.run_grid(config, sweeps, SEEDS, workdir, train=train,
                                log=lambda _: None)
  return config, sweeps, workdir, trained, calls


def test_grid_trains_each_variant_and_seed_in_its_own_workdir(grid):
  _, _, workdir, trained, calls = grid
  assert trained == 4
  assert [(p, s) for p, s, _ in calls] == [("learn", 0), ("learn", 1), ("sincos2d", 0),
                                           ("sincos2d", 1)]
  assert [os.path.relpath(w, workdir) for _, _, w in calls] == [
      "model.posemb=learn/seed_0", "model.posemb=learn/seed_1",
      "model.posemb=sincos2d/seed_0", "model.posemb=sincos2d/seed_1"]
  # The seed reached the run: its saved config says so.
  with open(os.path.join(calls[1][2], "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["seed"] == 1 and saved["model"]["posemb"] == "learn"


def test_report_holds_the_runs_real_final_accuracies(grid):
  config, sweeps, workdir, _, _ = grid
  report = ablation.write_report(workdir, sweeps, SEEDS, STEPS, title="tiny")
  want = {(p, s): _final_eval_accuracy(os.path.join(workdir, f"model.posemb={p}", f"seed_{s}"))
          for p in ("learn", "sincos2d") for s in SEEDS}
  with open(report["csv"], encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(r["model.posemb"], int(r["seed"])) for r in rows] == list(want)
  for r in rows:
    assert float(r["accuracy"]) == pytest.approx(want[(r["model.posemb"], int(r["seed"]))],
                                                 abs=1e-6)
  md = open(report["md"], encoding="utf-8").read()
  for posemb in ("learn", "sincos2d"):
    accs = [want[(posemb, s)] for s in SEEDS]
    mean, std = 100 * np.mean(accs), 100 * np.std(accs, ddof=1)
    assert f"| `{posemb}` | 2 | {mean:.2f} +- {std:.2f} |" in md
  with Image.open(report["png"]) as image:
    assert image.format == "PNG" and min(image.size) > 100
  del config


def test_rerun_trains_nothing(grid):
  config, sweeps, workdir, _, calls = grid
  metrics = {w: open(os.path.join(w, "metrics.jsonl"), encoding="utf-8").read()
             for _, _, w in calls}
  spy = []
  logged = []
  trained = ablation.run_grid(config, sweeps, SEEDS, workdir,
                              train=lambda c, w: spy.append(w), log=logged.append)
  assert trained == 0 and spy == []
  assert "4 finished, 0 to train" in logged[0]
  for w, text in metrics.items():
    assert open(os.path.join(w, "metrics.jsonl"), encoding="utf-8").read() == text
  # An unfinished run (no exported params) is trained again, only that one.
  os.rename(os.path.join(calls[2][2], "params"), os.path.join(calls[2][2], "params.old"))
  assert ablation.run_grid(config, sweeps, SEEDS, workdir, train=lambda c, w: spy.append(w),
                           log=logged.append) == 1
  assert spy == [calls[2][2]]
  os.rename(os.path.join(calls[2][2], "params.old"), os.path.join(calls[2][2], "params"))


def test_values_parse_like_config_overrides():
  config = _config()
  assert ablation.parse_sweep("lr=1e-3,3", config).values == (1e-3, 3.0)
  assert ablation.parse_sweep("model.patch_size=2,4", config).values == (2, 4)
  assert ablation.parse_sweep("pp.area_range=(0.5,1.0),(1,1)", config).values == (
      (0.5, 1.0), (1, 1))
  assert ablation.parse_sweep("model.classifier=token,gap", config).values == ("token", "gap")
  grid = ablation.variants([ablation.parse_sweep("pp.crop=16,32", config),
                            ablation.parse_sweep("model.patch_size=4,8", config)])
  assert [ablation.variant_name(v) for v in grid] == [
      "pp.crop=16,model.patch_size=4", "pp.crop=16,model.patch_size=8",
      "pp.crop=32,model.patch_size=4", "pp.crop=32,model.patch_size=8"]
  # pp.crop is linked to model.image_size: a variant sets both, the base is untouched.
  variant = ablation.variant_config(config, grid[2], seed=1)
  assert (variant.pp.crop, variant.model.image_size, variant.seed) == (32, 32, 1)
  assert (config.pp.crop, config.model.image_size) == (16, 16)


@pytest.mark.parametrize("spec,message", [
    ("lr", "expected FIELD=V1,V2"),
    ("lr=", "expected FIELD=V1,V2"),
    ("lr=1,,2", "expected FIELD=V1,V2"),
    ("learning_rate=1,2", "no field config.learning_rate"),
    ("model.posembb=learn", "no field config.model.posembb. Fields of config.model:"),
    ("lr=fast,slow", "'fast' is not a valid value for lr (float)"),
    ("total_steps=10,10", "repeated"),
])
def test_bad_sweeps_are_named(spec, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    ablation.parse_sweep(spec, _config())


def test_command_reports_a_bad_sweep_without_a_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run(
      [sys.executable, "-m", "vit_jax.ablate", "--sweep=model.nope=1,2", "--seeds=1",
       f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=120, check=False)
  assert result.returncode == 2
  assert "Error: --sweep=model.nope=...: the config has no field config.model.nope" in \
      result.stderr
  assert "Traceback" not in result.stderr
