"""The one check of a training config, before anything is built or written.

`check_config(config)` reports every problem at once, each naming its field, in one
ConfigError; `make_mesh(config)` builds the device mesh with the field named on failure.
`check_start(config, workdir, mesh)` adds what needs the outside world: the dataset's
classes against the head and between the splits, and whether the workdir can be used;
`warnings(...)` are the allowed oddities worth a line.
Defaults live only in configs/common.py: every field read here must be set there.

`config.model.name` rule: a name shaped like the registry's, `[R<n>+]ViT-<Size>_<patch>`
with a capitalised size code (`ViT-B_16`, `R50+ViT-L_32`, also `ViT-X_99`), must be a
registered name (a typo would otherwise train the config's fields under a wrong label);
its fields may still be overridden (`--config.model.patch_size=32`), the name is then the
starting point, not a promise. Any other name (`ViT-digits_4`, `my-vit`) is a free label
for the fields in config.model. Either way the model built is config.model's fields.
"""

import os
import re

import jax

from vit_jax import models
from vit_jax import storage
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.training import evaluators
from vit_jax.training import objectives
from vit_jax.training import optim


class ConfigError(ValueError):
  """A config that cannot train; the message lists every problem found."""


_POSITIVE = ("total_steps", "log_every", "checkpoint_every", "batch_size", "eval_batch_size",
             "keep_checkpoints", "prefetch", "preemption_sync_every", "fsdp_min_size")
_NON_NEGATIVE = ("eval_every", "warmup_steps", "data_workers", "data_threads")


def make_mesh(config):
  """The device mesh of `config.mesh`, with the config field named in any error."""
  try:
    return mesh_lib.make_mesh(config.mesh)
  except ValueError as e:
    raise ConfigError(f"config.mesh={config.mesh!r} does not fit the {jax.device_count()} "
                      f"devices ({jax.devices()[0].platform}): {e} Set e.g. "
                      "--config.mesh=\"(('data', -1),)\".") from e


_MODEL_POSITIVE = ("patch_size", "hidden_size", "mlp_dim", "num_heads", "num_layers",
                   "image_size", "num_channels")
_RATES = ("model.dropout_rate", "model.attention_dropout_rate", "model.stochastic_depth")
_UNIT_INTERVAL = ("momentum", "b1", "b2")  # In [0, 1).
# Names shaped like the registry's: '[R<n>+]ViT-<Size>_<patch>[-gap-norep]'.
_REGISTRY_SHAPED = re.compile(r"^(R\d*\+)?ViT-[A-Z][a-z]?_\d+(-.*)?$")


def _get(config, dotted):
  node = config
  for key in dotted.split("."):
    node = node[key]
  return node


def _number(config, field):
  """The field's value as a float, or None when it is not a number (reported)."""
  value = _get(config, field)
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _ranges(config) -> list[str]:
  lines = [f"config.{f}={config[f]} must be positive." for f in _POSITIVE if int(config[f]) <= 0]
  lines += [f"config.{f}={config[f]} must be >= 0." for f in _NON_NEGATIVE if int(config[f]) < 0]
  if int(config.accum_steps) < 1:
    lines.append(f"config.accum_steps must be >= 1, got {config.accum_steps}.")
  lr = _number(config, "lr")
  if lr is None or not lr > 0:
    lines.append(f"config.lr={config.lr} must be > 0 (a negative rate climbs the loss, 0 learns nothing).")
  if not float(config.weight_decay or 0.0) >= 0:
    lines.append(f"config.weight_decay={config.weight_decay} must be >= 0.")
  for field in _UNIT_INTERVAL:
    value = _number(config, field)
    if value is None or not 0.0 <= value < 1.0:
      lines.append(f"config.{field}={_get(config, field)} must be in [0, 1).")
  for field in _RATES:
    value = _number(config, field)
    if value is None or not 0.0 <= value < 1.0:
      lines.append(f"config.{field}={_get(config, field)} must be in [0, 1) (a rate).")
  for field in _MODEL_POSITIVE:
    value = config.model[field]
    if not isinstance(value, int) or value <= 0:
      lines.append(f"config.model.{field}={value} must be a positive integer.")
  if config.num_classes is not None and int(config.num_classes) < 2:
    lines.append(f"config.num_classes={config.num_classes} must be >= 2, or None (the "
                 "dataset's number of classes).")
  return lines


def _model_name(config) -> list[str]:
  name = config.model.name
  if not isinstance(name, str) or not name:
    return [f"config.model.name={name!r} must be a non-empty name."]
  if name in models.MODEL_NAMES or not _REGISTRY_SHAPED.match(name):
    return []
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(name, models.MODEL_NAMES, n=3, cutoff=0.6)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  return [f"config.model.name={name!r} is shaped like a registered model name but is not "
          f"one.{hint} Registered: {', '.join(models.MODEL_NAMES)}. A registered name may "
          "have its fields overridden (--config.model.patch_size=32); a custom model needs "
          "a name not of the form ViT-<Size>_<patch> (e.g. 'ViT-tiny_4' or 'my-vit'), and "
          "its config.model fields say what is built."]


def _patch_grid(config) -> list[str]:
  m = config.model
  if m.resnet_layers is not None or not all(
      isinstance(m[f], int) and m[f] > 0 for f in ("image_size", "patch_size")):
    return []
  if m.image_size % m.patch_size:
    return [f"config.model.image_size={m.image_size} (config.pp.crop) is not a multiple of "
            f"config.model.patch_size={m.patch_size}."]
  return []


def _optimizer(config) -> list[str]:
  if int(config.total_steps) <= 0 or int(config.warmup_steps) < 0:
    return []  # Reported by _ranges; the schedule would only say it again.
  try:
    optim.make_optimizer(config)  # Schedule, optimizer name, warm-up and clipping.
  except ValueError as e:
    return [str(e)]
  return []


def _model(config) -> list[str]:
  try:
    models.from_config(config.model, None)
  except ValueError as e:
    return [str(e)]
  return []


def _batches(config, mesh) -> list[str]:
  lines = []
  for field, size, accum in (("batch_size", config.batch_size, config.accum_steps),
                             ("eval_batch_size", config.eval_batch_size, 1)):
    if int(size) <= 0 or int(accum) < 1:
      continue  # Reported by _ranges.
    try:
      mesh_lib.check_batch_divisible(int(size), mesh, int(accum), f"config.{field}")
    except ValueError as e:
      lines.append(str(e))
  return lines


def _recipes(config) -> list[str]:
  """RandAugment, EMA, layer decay and the config.evals entries (issue 14)."""
  from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top (grain)
  lines = []
  try:
    pipeline.randaugment_from_config(config)
  except ValueError as e:
    lines.append(str(e))
  if not 0.0 <= float(config.ema_decay) < 1.0:
    lines.append(f"config.ema_decay={config.ema_decay} must be in [0, 1) (0 = off; e.g. "
                 "0.9999).")
  if config.export_ema and not float(config.ema_decay) > 0:
    lines.append("config.export_ema=True needs config.ema_decay > 0.")
  if float(config.layer_decay) != 1.0 and config.objective != "classification":
    lines.append(f"config.layer_decay={config.layer_decay} is for fine-tuning a classifier; "
                 f"config.objective={config.objective!r} needs 1.0.")
  return lines + evaluators.problems(config)


def _augmentation(config) -> list[str]:
  """The host-side training augmentation fields of config.pp."""
  pp, lines = config.pp, []
  area = tuple(pp.area_range) if isinstance(pp.area_range, (tuple, list)) else ()
  if not (len(area) == 2 and 0 < float(area[0]) <= float(area[1]) <= 1):
    lines.append(f"config.pp.area_range={pp.area_range!r} must be (low, high) with "
                 "0 < low <= high <= 1: the crop's share of the image area (paper 0.05-1).")
  if not 0.0 <= float(pp.random_erase) <= 1.0:
    lines.append(f"config.pp.random_erase={pp.random_erase} must be in [0, 1] (the "
                 "chance per image; 0 = off, DeiT 0.25).")
  if int(pp.repeated_aug) < 1:
    lines.append(f"config.pp.repeated_aug={pp.repeated_aug} must be a positive "
                 "number of copies (1 = off, DeiT 3).")
  return lines


def _heads(config) -> list[str]:
  m = config.model
  if int(m.hidden_size) > 0 and int(m.num_heads) > 0 and int(m.hidden_size) % int(m.num_heads):
    return [f"config.model.hidden_size={m.hidden_size} is not divisible by "
            f"config.model.num_heads={m.num_heads}: each head takes hidden_size / num_heads "
            "channels."]
  return []


def problems(config, mesh=None) -> list[str]:
  """Every problem of `config` (with `mesh`, also the batch layout), one line each."""
  lines = _ranges(config) + _model_name(config) + _patch_grid(config) + _heads(config)
  lines += _optimizer(config)
  if not any("config.model." in line for line in lines):
    lines += _model(config)  # On out-of-range fields it would only repeat them, worse.
  try:
    lines += objectives.get(config).problems(config)
  except ValueError as e:
    lines.append(str(e))
  lines += _augmentation(config) + _recipes(config)
  if mesh is not None:
    lines += _batches(config, mesh)
  return lines


def check_config(config, mesh=None) -> None:
  """ConfigError listing every problem of `config` (see `problems`), if any."""
  _raise(problems(config, mesh))


# ------------------------------------------------------------------ data and workdir


def _folder_split_classes(config, split) -> set:
  """Class names present in one split of an unprepared image folder (a listing, no reads)."""
  from vit_jax.data import folder as folder_lib  # pylint: disable=g-import-not-at-top
  root = os.path.abspath(os.path.expanduser(config.dataset))
  class_names, examples = folder_lib.scan_folder(root)
  items = folder_lib.select_split(examples, split, root)
  return {class_names[label] for _, label in items}


def _is_unprepared_folder(config) -> bool:
  from vit_jax.data import folder as folder_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  if config.dataset == "digits" or not sources.is_folder_spec(config.dataset):
    return False
  root = os.path.abspath(os.path.expanduser(config.dataset))
  prepared = folder_lib.prepared_dir(root, sources.data_dir_of(config))
  return not os.path.exists(os.path.join(prepared, "dataset_info.json"))


def class_problems(config, info) -> list[str]:
  """The head, the train split and the eval split agree on the classes.

  `info`: data.get_info(config). Image folders are compared by class folder name per
  split; tfds datasets (and prepared folders) share one ClassLabel over their splits, so
  only the head is compared with it (reading every label would mean reading the data).
  """
  if config.objective != "classification":
    return []
  lines = []
  n = len(info.class_names)
  if config.num_classes is not None and int(config.num_classes) < n:
    lines.append(f"config.num_classes={config.num_classes} is smaller than the "
                 f"{n} classes of {info.name}: labels >= {config.num_classes} would fall "
                 "outside the head. Set --config.num_classes=None (the dataset's count) "
                 f"or {n}.")
  if _is_unprepared_folder(config):
    train = _folder_split_classes(config, config.train_split)
    evals = _folder_split_classes(config, config.eval_split)
    if len(train) < 2:
      lines.append(f"config.dataset={config.dataset!r}: the train split "
                   f"{config.train_split!r} has {len(train)} class folder(s) "
                   f"({', '.join(sorted(train))}); a classifier needs at least 2.")
    unknown = sorted(evals - train)
    if unknown:
      lines.append(f"config.dataset={config.dataset!r}: the eval split "
                   f"{config.eval_split!r} has class(es) the train split "
                   f"{config.train_split!r} lacks: {', '.join(unknown)}. Add training "
                   "images for them or remove those folders from the eval split.")
  elif n < 2:
    lines.append(f"config.dataset={config.dataset!r} has {n} class(es); a classifier needs "
                 "at least 2.")
  return lines


def class_warnings(config, info) -> list[str]:
  if config.objective != "classification" or config.num_classes is None:
    return []
  n = len(info.class_names)
  if int(config.num_classes) > n:
    return [f"config.num_classes={config.num_classes} is larger than the {n} classes of "
            f"{info.name}: the extra {int(config.num_classes) - n} logits are never a "
            "target."]
  return []


def workdir_problems(workdir) -> list[str]:
  """Whether the workdir can be used: a directory (or creatable), writable; nothing written.

  Local paths are checked with os.access up to the nearest existing ancestor; gs://
  workdirs by the storage check (reachable bucket), the lock's write-back proves writing.
  """
  try:
    path = storage.as_path(workdir)
  except storage.StorageError as e:
    return [f"--workdir: {e}"]
  if storage.is_remote(path):
    return []
  text = os.fspath(path)
  if os.path.exists(text) and not os.path.isdir(text):
    return [f"--workdir={workdir}: {text} exists and is not a directory (a file?). Give a "
            "directory, or a path that does not exist yet."]
  existing = text
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return [f"--workdir={workdir}: {existing} is a file, so {text} cannot be created under "
            "it. Choose another path."]
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "the workdir" if existing == text else f"its parent {existing}"
    return [f"--workdir={workdir}: {what} is not writable by this user. Choose a "
            "writable path (or fix the permissions)."]
  return []


def check_start(config, workdir, mesh, info) -> list[str]:
  """ConfigError listing every problem of config + workdir + data; returns the warnings."""
  lines = problems(config, mesh) + workdir_problems(workdir)
  if info is not None:
    lines += class_problems(config, info)
  _raise(lines)
  return class_warnings(config, info) if info is not None else []


def _raise(lines):
  if len(lines) == 1:
    raise ConfigError(lines[0])
  if lines:
    raise ConfigError(f"The config has {len(lines)} problems:\n  " + "\n  ".join(lines))
