"""reporting.Reporter: progress lines, metrics.jsonl (trimmed on resume), config, plots."""

import io
import json
import os

import ml_collections
import pytest

from vit_jax.training import reporting
from vit_jax.training import workdir as workdir_lib


def _reporter(workdir, stream, **kwargs):
  return reporting.Reporter(str(workdir), total_steps=100, batch_size=32, stream=stream,
                            **kwargs)


def test_progress_line_and_records(tmp_path):
  stream = io.StringIO()
  report = _reporter(tmp_path, stream)
  metrics = report.train(10, {"loss": 1.23456, "learning_rate": 3e-4, "grad_norm": 0.5})
  report.eval(10, {"accuracy": 0.75, "accuracy_top5": 0.95, "loss": 0.8, "num_examples": 360})
  report.close()
  line, eval_line = stream.getvalue().splitlines()
  assert line.startswith("step  10/100 | loss 1.2346 | lr 3.000e-04 | ")
  assert " img/s | ETA " in line and metrics["images_per_sec"] > 0
  assert eval_line == ("eval test @ step 10: accuracy 0.7500 | accuracy_top5 0.9500 | "
                       "loss 0.8000 | num_examples 360")
  records = reporting.read_metrics(str(tmp_path))
  assert [(r["kind"], r["step"]) for r in records] == [("train", 10), ("eval", 10)]
  assert records[0]["loss"] == pytest.approx(1.23456) and records[1]["accuracy"] == 0.75
  assert os.listdir(tmp_path / workdir_lib.TENSORBOARD_DIR)


def test_resume_drops_records_after_the_checkpoint(tmp_path):
  report = _reporter(tmp_path, io.StringIO())
  for step in (10, 20, 30):
    report.train(step, {"loss": 1.0, "learning_rate": 1e-3})
  report.close()
  # Preempted after step 30, last checkpoint at 20: steps 21..30 are trained again.
  report = _reporter(tmp_path, io.StringIO(), start_step=20)
  report.train(30, {"loss": 0.5, "learning_rate": 1e-3})
  report.close()
  records = reporting.read_metrics(str(tmp_path))
  assert [(r["step"], r["loss"]) for r in records] == [(10, 1.0), (20, 1.0), (30, 0.5)]


def test_other_processes_write_nothing(tmp_path):
  stream = io.StringIO()
  report = _reporter(tmp_path / "run", stream, is_main=False)
  report.train(10, {"loss": 1.0, "learning_rate": 1e-3})
  report.info("hello")
  report.close()
  assert stream.getvalue() == "" and not (tmp_path / "run").exists()


def test_config_files_and_plots(tmp_path):
  report = _reporter(tmp_path, io.StringIO())
  config = ml_collections.ConfigDict({"lr": 0.03, "model": {"patch_size": 16}})
  report.write_config(config)
  for step in (10, 20):
    report.train(step, {"loss": 2.0 / step, "learning_rate": 1e-3})
    report.eval(step, {"accuracy": step / 40, "accuracy_top5": step / 25, "loss": 1.0 / step})
  paths = report.plot()
  report.close()
  assert json.loads((tmp_path / "config.json").read_text()) == {
      "lr": 0.03, "model": {"patch_size": 16}}
  assert "patch_size: 16" in (tmp_path / "config.yaml").read_text()
  assert sorted(os.path.basename(p) for p in paths) == ["accuracy.png", "loss.png"]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_mode(tmp_path):
  stream = io.StringIO()
  report = _reporter(tmp_path, stream, progress_bar=True)
  report.train(50, {"loss": 0.25, "learning_rate": 1e-3})
  report.info("note")
  report.close()
  out = stream.getvalue()
  assert "50/100" in out and "loss=0.2500" in out and "note" in out


def test_format_duration():
  assert reporting.format_duration(3723.4) == "1:02:03"
  assert reporting.format_duration(float("nan")) == "?"
