"""The layout of a run's workdir: every file name the trainer, reporting and tools use.

  WORKDIR/config.json, config.yaml   the resolved config of the run
  WORKDIR/metrics.jsonl              one JSON record per log/eval point
  WORKDIR/tensorboard/               TensorBoard event files
  WORKDIR/checkpoints/<step>/        Orbax train states (training/loop.py)
  WORKDIR/params/                    the final parameters (for init_from or inference)
  WORKDIR/labels.txt                 the dataset's class names, one per line (for predict)
  WORKDIR/loss.png, accuracy.png     curves drawn at the end
  WORKDIR/analysis/                  `python -m vit_jax.analyze` outputs
"""

import json
import os

import ml_collections

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


def resolve(workdir: str) -> str:
  """The workdir as an absolute local path."""
  return os.path.abspath(os.path.expanduser(workdir))


def file(workdir: str, name: str) -> str:
  """WORKDIR/name for one of the names above."""
  return os.path.join(workdir, name)


def is_from_scratch(init_from) -> bool:
  """True when `config.init_from` asks for no initial checkpoint.

  On the command line `--config.init_from=None` arrives as the string 'None'.
  """
  return init_from in (None, "", "None", "none")


def resolve_init_from(path: str) -> str:
  """The .npz file or Orbax params directory that `config.init_from` names.

  A workdir of an earlier run stands for its exported final parameters (`<workdir>/params`),
  or, if it has not finished, for the parameters of its latest checkpoint.
  """
  expanded = resolve(path)
  if not os.path.exists(expanded):
    raise FileNotFoundError(
        f"config.init_from={path!r} does not exist ({expanded}). Give a published .npz "
        "checkpoint (e.g. gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .), an Orbax "
        "params directory, or the workdir of a finished run; or unset it "
        "(--config.init_from=None) to train from scratch.")
  for name in (PARAMS_DIR, CHECKPOINT_DIR):  # Finished run, else its latest checkpoint.
    if os.path.isdir(expanded) and os.path.isdir(file(expanded, name)):
      return file(expanded, name)
  return expanded


def _merged(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for key, value in saved.items():
    both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
    out[key] = _merged(defaults[key], value) if both_dicts else value
  return out


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir (FileNotFoundError if it is not a workdir).

  Fields the saved file lacks (a workdir of an older version) take configs/common.py's
  defaults.
  """
  from configs import common  # pylint: disable=g-import-not-at-top
  path = file(workdir, CONFIG_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a trainer workdir?")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(_merged(common.get_config().to_dict(), saved))


def write_config(workdir: str, config) -> None:
  """Saves the resolved config as config.json and config.yaml."""
  with open(file(workdir, CONFIG_JSON), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  with open(file(workdir, CONFIG_YAML), "w", encoding="utf-8") as f:
    f.write(str(config))


def write_labels(workdir: str, class_names) -> None:
  """Saves the class names, one per line, in class-index order (read by vit_jax.predict)."""
  with open(file(workdir, LABELS_FILE), "w", encoding="utf-8") as f:
    f.write("".join(f"{name}\n" for name in class_names))
