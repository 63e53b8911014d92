"""The training loop in-process: it learns digits, and bad input fails early and clearly."""

import json
import os

import jax
import numpy as np
import pytest

from trainer_fixtures import tiny_config
from vit_jax import checkpoints
from vit_jax.training import reporting
from vit_jax.training import loop
from vit_jax.training import workdir as workdir_lib

LEARN_BAR = 0.80  # Test accuracy the tiny model must reach on digits within LEARN_STEPS.
LEARN_STEPS = 150


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
  """One short run shared by the learning tests: (summary, workdir)."""
  workdir = str(tmp_path_factory.mktemp("learn"))
  config = tiny_config(total_steps=LEARN_STEPS, eval_every=75,
                       checkpoint_every=75, log_every=25, plots=True)
  summary = loop.train_and_evaluate(config, workdir)
  return summary, workdir


def test_tiny_model_learns_digits(learned):
  summary, workdir = learned
  assert summary["step"] == LEARN_STEPS and not summary["preempted"]
  assert summary["accuracy"] >= LEARN_BAR, summary
  assert summary["best_accuracy"] >= summary["accuracy"] - 1e-9
  assert summary["accuracy_top5"] >= summary["accuracy"]
  records = reporting.read_metrics(workdir)
  train_losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert [r["step"] for r in records if r["kind"] == "train"] == [25, 50, 75, 100, 125, 150]
  # ln(10) = 2.30 at chance; the loss must fall well below it.
  assert train_losses[0] > 1.5 and train_losses[-1] < 0.8 * train_losses[0], train_losses
  evals = [r for r in records if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [75, 150]
  assert evals[-1]["num_examples"] == 360  # The whole digits test split, padding masked.
  assert evals[-1]["accuracy"] == pytest.approx(summary["accuracy"])


def test_run_leaves_config_metrics_plots_and_params(learned):
  summary, workdir = learned
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["total_steps"] == LEARN_STEPS and saved["model"]["hidden_size"] == 32
  assert saved["model"]["image_size"] == saved["pp"]["crop"] == 16
  assert os.path.exists(os.path.join(workdir, "config.yaml"))
  for name in ("loss.png", "accuracy.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert any(n.startswith("events.out.tfevents")
             for n in os.listdir(os.path.join(workdir, workdir_lib.TENSORBOARD_DIR)))
  assert sorted(os.listdir(summary["checkpoint_dir"])) == ["150", "75"]
  params = checkpoints.restore_params(summary["params_dir"])
  assert params["head"]["kernel"].shape == (32, 10)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_rerunning_a_finished_run_only_evaluates(learned, capsys):
  summary, workdir = learned
  config = tiny_config(total_steps=LEARN_STEPS, eval_every=75,
                       checkpoint_every=75, log_every=25)
  again = loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f"Resumed from the checkpoint at step {LEARN_STEPS}" in out
  assert again["step"] == LEARN_STEPS
  assert again["accuracy"] == pytest.approx(summary["accuracy"])


def test_finetune_from_the_workdir_at_higher_resolution(learned, tmp_path, capsys):
  """init_from=<finished workdir>: its params, a fresh head, the 4x4 posemb grid -> 8x8."""
  _, pretrained = learned
  config = tiny_config(total_steps=30, init_from=pretrained, optimizer="sgd", lr=0.03,
                       warmup_steps=3, eval_every=0, checkpoint_every=30)
  config.pp.crop = 32
  summary = loop.train_and_evaluate(config, str(tmp_path / "finetune"))
  out = capsys.readouterr().out
  assert f"Initialising from {os.path.join(pretrained, 'params')}" in out
  assert "(10 classes, 32 px)" in out
  params = checkpoints.restore_params(summary["params_dir"])
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 8 * 8, 32)
  # The pre-trained features transfer: far above chance (10 %) after 30 steps of a new head.
  assert summary["accuracy"] >= 0.6, summary


def test_batch_not_divisible_by_devices(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"config.batch_size=12 is not divisible by the 8 "
                     r"data-parallel devices.*--config.batch_size=8 or 16"):
    loop.train_and_evaluate(tiny_config(batch_size=12), workdir)
  assert not os.path.exists(workdir)  # Failed before anything was written.


def test_eval_batch_not_divisible_by_devices(tmp_path):
  with pytest.raises(ValueError, match=r"config.eval_batch_size=100 is not divisible"):
    loop.train_and_evaluate(tiny_config(eval_batch_size=100), str(tmp_path / "run"))


def test_mesh_that_does_not_match_the_devices(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"config.mesh=\(\('data', 3\),\) does not fit the 8 "
                     r"devices.*needs 3 devices"):
    loop.train_and_evaluate(tiny_config(mesh=[("data", 3)]), workdir)
  assert not os.path.exists(workdir)


def test_init_from_missing_path(tmp_path):
  workdir = str(tmp_path / "run")
  missing = str(tmp_path / "nowhere" / "ViT-B_16.npz")
  with pytest.raises(FileNotFoundError, match=r"config.init_from=.*nowhere/ViT-B_16.npz' "
                     r"does not exist"):
    loop.train_and_evaluate(tiny_config(init_from=missing), workdir)
  assert not os.path.exists(workdir)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Step 1 runs at lr 0 (warm-up start) and is checkpointed; lr 1e9 then blows up the
  # weights, and the loss turns NaN a step or two later.
  workdir = str(tmp_path / "run")
  config = tiny_config(total_steps=20, lr=1e9, warmup_steps=2, checkpoint_every=1,
                       log_every=1, eval_every=0, optimizer="sgd", grad_clip_norm=0.0)
  with pytest.raises(loop.TrainingDivergedError) as info:
    loop.train_and_evaluate(config, workdir)
  message = str(info.value)
  diverged = int(message.split("Training diverged at step ")[1].split(":")[0])
  assert 2 <= diverged <= 20
  assert "loss=nan" in message or "loss=inf" in message or "grad_norm=" in message
  assert f"The last good checkpoint is step {diverged - 1}" in message
  assert "Lower config.lr" in message
  ckpt = checkpoints.TrainCheckpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == diverged - 1
  ckpt.close()
  params = checkpoints.restore_params(os.path.join(workdir, "checkpoints"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
