"""The recipe configs (AugReg, DeiT, small-data folder) load and pass the config check."""

import pytest

import data_fixtures as fx
from trainer_fixtures import load_config_file
from vit_jax.training import config_check

AUGREG_ARGS = [f"{m},{d}" + (f",{s}" if s else "") for m in ("S/16", "B/16")
               for d in ("imagenet2012", "imagenet21k")
               for s in (None, "light", "medium", "strong", "none", "light2", "medium2",
                         "strong2")]


@pytest.mark.parametrize("arg", AUGREG_ARGS)
def test_augreg_recipes_pass_the_check(arg):
  c = load_config_file("augreg", arg)
  assert config_check.problems(c) == []
  assert (c.optimizer, c.lr, c.batch_size, c.warmup_steps) == ("adam", 1e-3, 4096, 10_000)


@pytest.mark.parametrize("arg, ra, mixup, wd, do, sd, name", [
    # The published checkpoints' settings (gs://vit_models/augreg/ file names).
    ("S/16,imagenet2012", (2, 15), 0.5, 0.1, 0.0, 0.0, "ViT-S_16"),
    ("B/16,imagenet2012", (2, 15), 0.5, 0.1, 0.1, 0.1, "ViT-B_16"),
    ("S/16,imagenet21k", (2, 0), 0.0, 0.03, 0.0, 0.0, "ViT-S_16"),
    ("B/16,imagenet21k", (2, 15), 0.2, 0.1, 0.0, 0.0, "ViT-B_16"),
    ("B/16,imagenet2012,light1", (2, 0), 0.0, 0.1, 0.1, 0.1, "ViT-B_16"),
    ("B/16,imagenet2012,light2", (2, 10), 0.2, 0.1, 0.1, 0.1, "ViT-B_16"),
    ("B/16,imagenet2012,medium1", (2, 15), 0.2, 0.1, 0.1, 0.1, "ViT-B_16"),
    ("S/16,imagenet2012,strong1", (2, 20), 0.5, 0.1, 0.0, 0.0, "ViT-S_16"),
    ("S/16,imagenet2012,strong2", (2, 20), 0.8, 0.1, 0.0, 0.0, "ViT-S_16"),
    ("S/16,imagenet2012,none", None, 0.0, 0.1, 0.0, 0.0, "ViT-S_16"),
])
def test_augreg_settings(arg, ra, mixup, wd, do, sd, name):
  c = load_config_file("augreg", arg)
  assert c.pp.randaugment == ra and c.mixup_alpha == mixup and c.cutmix_alpha == 0
  assert (c.weight_decay, c.model.dropout_rate, c.model.stochastic_depth) == (wd, do, sd)
  assert c.model.name == name
  assert (c.loss == "sigmoid_xent") == ("imagenet21k" in arg)
  assert c.total_steps == (1_281_167 if "2012" in arg else 12_743_321) * 300 // 4096


def test_bad_augreg_argument():
  with pytest.raises(ValueError, match="MODEL,DATASET"):
    load_config_file("augreg", "L/16,imagenet2012")
  with pytest.raises(ValueError, match="SETTING"):
    load_config_file("augreg", "B/16,imagenet2012,extreme")


@pytest.mark.parametrize("arg, name", [("S/16", "ViT-S_16"), ("B/16", "ViT-B_16")])
def test_deit_recipes(arg, name):
  c = load_config_file("deit", arg)
  assert config_check.problems(c) == []
  assert c.model.name == name and c.pp.randaugment == (2, 9)
  assert (c.pp.random_erase, c.pp.repeated_aug, c.pp.randaugment_magnitude_std) == (
      0.25, 3, 0.5)
  assert (c.mixup_alpha, c.cutmix_alpha, c.mix_prob, c.label_smoothing) == (0.8, 1.0, 1.0, 0.1)
  assert (c.lr, c.weight_decay, c.ema_decay, c.model.stochastic_depth) == (1e-3, 0.05, 0.99996, 0.1)
  assert c.total_steps == 300 * (1_281_167 // 1024)


def test_folder_recipe(tmp_path):
  root = tmp_path / "photos"
  fx.write_image_folder(str(root))
  c = load_config_file("folder_finetune", str(root))
  assert config_check.problems(c) == []
  assert c.dataset == str(root) and c.init_from.endswith("ViT-B_16.npz")
  assert c.pp.randaugment == (2, 5) and c.mixup_alpha == 0
  with pytest.raises(ValueError, match="image folder"):
    load_config_file("folder_finetune", "")


def test_recipe_fields_from_the_command_line():
  import sys
  from absl import flags
  from ml_collections import config_flags
  from trainer_fixtures import CONFIGS
  saved = sys.argv
  sys.argv = ["main", f"--config={CONFIGS}/folder_finetune.py:/photos",
              "--config.pp.randaugment=(2, 15)", "--config.mixup_alpha=0.2",
              "--config.ema_decay=0.999", "--config.layer_decay=0.75",
              "--config.pp.randaugment_ops=('Rotate', 'Invert')"]
  try:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", f"{CONFIGS}/default.py", flag_values=fv,
                                    lock_config=True)
    fv(sys.argv)
    c = fv.config
  finally:
    sys.argv = saved
  assert tuple(c.pp.randaugment) == (2, 15) and c.mixup_alpha == 0.2
  assert (c.ema_decay, c.layer_decay) == (0.999, 0.75)
  assert tuple(c.pp.randaugment_ops) == ("Rotate", "Invert")
