"""Command line: `python -m vit_jax.main [--config=configs/X.py[:ARG]] [--workdir=DIR]
[--config.FIELD=VALUE ...]`.

Without --config it runs the embedded default job (a small ViT on the digits dataset) in
./workdir/default. Every config field can be overridden, e.g.
`--config.model.patch_size=32 --config.batch_size=256`; see configs/common.py for the fields.
Rerunning the same command resumes from the newest checkpoint in the workdir.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from vit_jax import platform

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Training config file (configs/*.py), optionally "
    "with an argument after ':', e.g. configs/vit_b16.py:cifar100.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and plots (default: "
    "./workdir/<config file name>). An existing one is resumed.")


def default_workdir(config_path: str) -> str:
  """./workdir/default for configs/default.py; ./workdir/vit_b16_cifar100 for vit_b16.py:cifar100."""
  path, _, arg = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "_" + "_".join(p.strip() for p in arg.split(",") if p.strip())
  return os.path.join(".", "workdir", name)


def _config_path() -> str:
  return flags.FLAGS["config"].config_filename or DEFAULT_CONFIG


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; config fields are set with "
                         "--config.FIELD=VALUE.")
  platform.configure_cpu_devices()  # Before anything initialises the JAX backends.
  config = _CONFIG.value
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(config)
  from vit_jax import trainer  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value or default_workdir(_config_path())
  print(f"Config {_config_path()}, workdir {os.path.abspath(workdir)}", flush=True)
  try:
    summary = trainer.train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError, trainer.TrainingDivergedError) as e:
    # Errors about the user's input or a diverged run: the message says what to do, so
    # no traceback. Anything else is a bug and keeps its traceback.
    print(f"Error: {e}", file=sys.stderr, flush=True)
    return 1
  return 0 if summary is not None else 1


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
