"""The config files: the paper's recipes, the embedded default, and command-line overrides."""

import sys

import pytest
from absl import flags
from ml_collections import config_flags

from trainer_fixtures import CONFIGS, load_config_file
from vit_jax import models
from vit_jax.training import optim

RECIPES = {"vit_b16": "ViT-B_16", "vit_l16": "ViT-L_16", "vit_h14": "ViT-H_14",
           "r50_vit_b16": "R50+ViT-B_16"}
DATASETS = ("cifar10", "cifar100", "oxford_iiit_pet", "oxford_flowers102", "imagenet2012")


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("dataset", DATASETS)
def test_finetune_recipe_follows_the_paper(name, dataset):
  c = load_config_file(name, dataset)
  assert c.model.name == RECIPES[name] and c.dataset == dataset
  assert (c.optimizer, c.momentum, c.weight_decay) == ("sgd", 0.9, 0.0)
  assert (c.batch_size, c.schedule, c.warmup_steps, c.grad_clip_norm) == (512, "cosine", 500, 1.0)
  assert c.pp.crop == c.model.image_size == 384
  assert c.total_steps == {"cifar10": 10_000, "cifar100": 10_000, "imagenet2012": 20_000}.get(
      dataset, 500)
  assert c.init_from.endswith(f"{RECIPES[name]}.npz")
  assert c.eval_split == ("validation" if dataset == "imagenet2012" else "test")
  large = name in ("vit_l16", "vit_h14")
  assert (c.fsdp, c.model.scan) == (large, large)
  assert c.model.remat_policy == ("nothing_saveable" if large else "none")
  models.from_config(c.model, 10)  # A valid model config.


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_pretrain_recipe_follows_the_paper(name):
  c = load_config_file(name, "imagenet2012,pretrain")
  assert (c.optimizer, c.b1, c.b2, c.weight_decay) == ("adam", 0.9, 0.999, 0.1)
  assert (c.batch_size, c.schedule, c.warmup_steps, c.grad_clip_norm) == (4096, "linear", 10_000, 1.0)
  assert c.init_from is None and c.pp.crop == c.model.image_size == 224
  assert c.total_steps == 1_281_167 * 300 // 4096  # 300 epochs.
  assert c.lr == {"vit_l16": 4e-4, "vit_h14": 3e-4}.get(name, 1e-3)
  # The schedule warms up linearly to lr, then decays linearly to 0.
  schedule = optim.make_schedule(c)
  assert float(schedule(5_000)) == pytest.approx(c.lr / 2, rel=1e-3)
  assert float(schedule(10_000)) == pytest.approx(c.lr, rel=1e-3)
  assert float(schedule(c.total_steps)) == pytest.approx(0.0, abs=1e-9)


def test_imagenet21k_pretraining_uses_sigmoid_and_head_bias():
  c = load_config_file("vit_b16", "imagenet21k")
  assert c.loss == "sigmoid_xent" and c.model.head_bias_init == -10.0
  assert c.total_steps == 12_743_321 * 90 // 4096


def test_bad_recipe_argument():
  with pytest.raises(ValueError, match=r"No fine-tuning recipe for dataset 'mnist'"):
    load_config_file("vit_b16", "mnist")
  with pytest.raises(ValueError, match=r"should be 'DATASET' or 'DATASET,pretrain'"):
    load_config_file("vit_b16", "cifar10,train")


def test_default_job_and_its_finetune():
  c = load_config_file("default")
  assert c.dataset == "digits" and c.init_from is None
  assert (c.model.patch_size, c.model.hidden_size, c.pp.crop, c.model.image_size) == (4, 64, 16, 16)
  assert c.pp.flip is False  # Mirrored digits are other digits.
  ft = load_config_file("default_finetune")
  assert ft.init_from == "./workdir/default"
  assert ft.pp.crop == ft.model.image_size == 32  # 8x8 patch grid instead of 4x4.
  assert (ft.optimizer, ft.schedule) == ("sgd", "cosine")
  assert ft.model.hidden_size == c.model.hidden_size  # Same architecture: loadable.


def _parse(argv):
  """Parses argv the way vit_jax.main does (config_flags reads overrides from sys.argv)."""
  saved = sys.argv
  sys.argv = ["main", *argv]
  try:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", f"{CONFIGS}/default.py", flag_values=fv,
                                    lock_config=True)
    fv(sys.argv)
    return fv.config
  finally:
    sys.argv = saved


def test_command_line_overrides():
  c = _parse([f"--config={CONFIGS}/vit_b16.py:cifar100", "--config.model.patch_size=32",
              "--config.batch_size=256", "--config.mesh=(('data', 4), ('model', 2))",
              "--config.init_from=/ckpts/ViT-B_32.npz", "--config.label_smoothing=0.1"])
  assert c.dataset == "cifar100" and c.model.patch_size == 32 and c.batch_size == 256
  assert tuple(c.mesh) == (("data", 4), ("model", 2))
  assert c.init_from == "/ckpts/ViT-B_32.npz" and c.label_smoothing == 0.1


def test_resolution_override_reaches_model_and_data():
  c = _parse(["--config.pp.crop=32"])
  assert c.pp.crop == c.model.image_size == 32
  c = _parse(["--config.model.image_size=24"])
  assert c.pp.crop == 24


def test_override_of_wrong_type_is_rejected():
  with pytest.raises(flags.IllegalFlagValueError, match=r"--config.batch_size=abc"):
    _parse(["--config.batch_size=abc"])
