"""The layout of a run's workdir: every file name the trainer, reporting and tools use.

  WORKDIR/config.json, config.yaml   the resolved config of the run
  WORKDIR/metrics.jsonl              one JSON record per log/eval point
  WORKDIR/tensorboard/               TensorBoard event files
  WORKDIR/checkpoints/<step>/        Orbax train states (training/loop.py)
  WORKDIR/params/                    the final parameters (for init_from or inference)
  WORKDIR/labels.txt                 the dataset's class names, one per line (for predict)
  WORKDIR/loss.png, accuracy.png     curves drawn at the end
  WORKDIR/analysis/                  `python -m vit_jax.analyze` outputs

WORKDIR is a local directory or a gs://bucket/dir; every file in it is read and written
through etils.epath (arrays through Orbax), never os.path / open().
"""

import json
import os

from etils import epath
import ml_collections

from vit_jax import storage

CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
PARAMS_DIR = "params"
ANALYSIS_DIR = "analysis"
LOSS_PLOT = "loss.png"
ACCURACY_PLOT = "accuracy.png"
LABELS_FILE = "labels.txt"


def resolve(workdir) -> str:
  """The workdir as an absolute local path, or the gs:// URL unchanged."""
  return os.fspath(storage.as_path(workdir))


def path(workdir, name: str = "") -> epath.Path:
  """WORKDIR/name as an epath.Path (local or gs://), for reading and writing."""
  root = storage.as_path(workdir)
  return root / name if name else root


def file(workdir, name: str) -> str:
  """WORKDIR/name for one of the names above, as a string."""
  return os.fspath(path(workdir, name))


def is_from_scratch(init_from) -> bool:
  """True when `config.init_from` asks for no initial checkpoint.

  On the command line `--config.init_from=None` arrives as the string 'None'.
  """
  return init_from in (None, "", "None", "none")


def _published():
  """checkpoints.published, imported on use: reading a workdir's files (vit_jax.load of an
  exported artifact, say) must not load the checkpoint and model code."""
  from vit_jax.checkpoints import published  # pylint: disable=g-import-not-at-top
  return published


def _not_found_message(init_from, resolved) -> str:
  published = _published()
  return (f"config.init_from={init_from!r} does not exist ({resolved}). Give a .npz "
          "checkpoint, an Orbax params directory or the workdir of an earlier run (local "
          "or gs://), or a published name (" + published.EXAMPLES + "); or unset it "
          "(--config.init_from=None) to train from scratch.")


def resolve_init_from(init_from: str, pretrained_root: str | None = None) -> str:
  """The .npz file or Orbax params directory that `config.init_from` names.

  `init_from` is a local or gs:// path, or a published name such as 'i21k:ViT-B_16'
  or 'augreg:B_16' (resolved under `pretrained_root`, see checkpoints/published.py).
  A workdir of an earlier run stands for its exported final parameters (`<workdir>/params`),
  or, if it has not finished, for the parameters of its latest checkpoint. A gs:// path
  is probed first (storage.check_reachable), so a wrong bucket fails at once.
  """
  published = _published()
  pretrained_root = pretrained_root or published.DEFAULT_ROOT
  text = os.fspath(init_from)
  local_exists = not storage.is_remote(text) and storage.as_path(text).exists()
  if published.is_name(text) and not local_exists:
    storage.check_reachable(pretrained_root, "config.pretrained_root")
    text = published.resolve(text, pretrained_root)
  resolved = storage.check_reachable(text, "config.init_from")
  if not resolved.exists():
    raise FileNotFoundError(_not_found_message(init_from, os.fspath(resolved)))
  if resolved.is_dir():
    for name in (PARAMS_DIR, CHECKPOINT_DIR):  # Finished run, else its latest checkpoint.
      if (resolved / name).is_dir():
        return os.fspath(resolved / name)
  return os.fspath(resolved)


def _merged(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for key, value in saved.items():
    both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
    out[key] = _merged(defaults[key], value) if both_dicts else value
  return out


def read_config(workdir) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir (FileNotFoundError if it is not a workdir).

  Fields the saved file lacks (a workdir of an older version) take configs/common.py's
  defaults.
  """
  from configs import common  # pylint: disable=g-import-not-at-top
  config_path = path(workdir, CONFIG_JSON)
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a trainer workdir?")
  saved = json.loads(config_path.read_text())
  return ml_collections.ConfigDict(_merged(common.get_config().to_dict(), saved))


def write_config(workdir, config) -> None:
  """Saves the resolved config as config.json and config.yaml."""
  path(workdir, CONFIG_JSON).write_text(
      config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  path(workdir, CONFIG_YAML).write_text(str(config))


def write_labels(workdir: str, class_names) -> None:
  """Saves the class names, one per line, in class-index order (read by vit_jax.predict)."""
  path(workdir, LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names))
