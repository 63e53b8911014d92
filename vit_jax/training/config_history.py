"""Resuming with a changed config: what may change, what may not, and the history kept.

A workdir's `config.json` is the config its last run used. When a run resumes from a
checkpoint, `compare(saved, config)` sorts the fields that differ:
  * *fixed* fields change the model, the parameters' shapes, the optimizer state or the
    data stream the checkpoint continues (`FIXED`: model.*, num_classes, objective, mpp.*,
    dataset, train_split, pp.*, batch_size, seed, optimizer, loss); resuming with one
    changed is refused, naming each field with its old and new value, unless the field is
    listed in `config.allow_config_change` ("model.dropout_rate,batch_size"; a group
    such as "pp" allows all its fields);
  * every other field (lr, total_steps, warm-up, eval/checkpoint/log cadence, mesh, ...)
    may change; the run prints one line saying what changed.
Fields that describe the machine rather than the run (`IGNORED`) are not compared.

  WORKDIR/config_history.jsonl   one record per run started in the workdir:
      {"step": the step it started from, "time", "changes": {field: [old, new]}, "config"}
"""

import json
import time

from vit_jax import storage
from vit_jax.models import params as names
from vit_jax.training import workdir as workdir_lib

HISTORY_FILE = "config_history.jsonl"

# Fields (or groups, ending in '.') whose change makes the checkpoint continue another run.
FIXED = ("model.", "num_classes", "objective", "mpp.", "dataset", "train_split", "pp.",
         "batch_size", "seed", "optimizer", "loss")
# Fields about the machine or the session, not the run.
IGNORED = ("distributed.", "allow_config_change", "data_workers", "data_threads", "prefetch",
           "progress_bar", "async_checkpoint", "lock_stale_after_s", "lock_heartbeat_s")


class ConfigChangeError(ValueError):
  """A resumed run changes fields fixed by its checkpoint."""


def as_json(config) -> dict:
  """The config as the JSON config.json holds (so saved and new compare alike)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _matches(field: str, patterns) -> bool:
  return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def allowed_overrides(config) -> tuple[str, ...]:
  """config.allow_config_change as patterns: 'pp' and 'pp.' allow every pp.* field."""
  text = config.allow_config_change or ""
  items = [s.strip() for s in str(text).split(",") if s.strip()]
  return tuple(items) + tuple(f"{s}." for s in items if not s.endswith("."))


def compare(saved: dict, config) -> tuple[dict, dict]:
  """({fixed field: (old, new)}, {other field: (old, new)}) of the fields that differ.

  `saved`: the JSON of config.json; a field it lacks (an older version) is not compared.
  """
  old, new = names.flatten(saved, sep="."), names.flatten(as_json(config), sep=".")
  fixed, free = {}, {}
  for field in sorted(set(old) & set(new)):
    if old[field] == new[field] or _matches(field, IGNORED):
      continue
    (fixed if _matches(field, FIXED) else free)[field] = (old[field], new[field])
  return fixed, free


def read_saved(workdir):
  """The JSON of WORKDIR/config.json, or None when there is none."""
  path = storage.as_path(workdir) / workdir_lib.CONFIG_JSON
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigChangeError(f"{path} is not valid JSON ({e}); it holds the config of the "
                            "run in this workdir. Restore it, or use a new --workdir.") from e


def _format(changes: dict) -> str:
  return ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changes.items())


def check_resume(saved, config, workdir) -> dict:
  """The changes against the saved config; ConfigChangeError if a fixed field changed.

  Returns {field: (old, new)} of every change allowed (free fields and overridden ones).
  """
  if saved is None:
    return {}
  fixed, free = compare(saved, config)
  overrides = allowed_overrides(config)
  refused = {k: v for k, v in fixed.items() if not _matches(k, overrides)}
  if refused:
    names = ",".join(refused)
    raise ConfigChangeError(
        f"The workdir {workdir} holds checkpoints of a run with a different config; "
        f"resuming would change {len(refused)} field(s) that the checkpoint fixes (the "
        f"model, its parameters' shapes, the optimizer state or the data stream): "
        f"{_format(refused)}. Use a new --workdir for the new config, or set them back; "
        f"to resume anyway with the change, add --config.allow_config_change={names}.")
  return dict(free, **fixed)


def describe_changes(changes: dict) -> str:
  return f"Resuming with a changed config: {_format(changes)}."


def append(workdir, step: int, config, changes: dict) -> None:
  """Adds this run's record to WORKDIR/config_history.jsonl (read, append, write back:
  epath has no append mode on object stores)."""
  path = storage.as_path(workdir) / HISTORY_FILE
  record = {"step": int(step), "time": round(time.time(), 3),
            "changes": {k: list(v) for k, v in changes.items()}, "config": as_json(config)}
  text = path.read_text() if path.exists() else ""
  path.write_text(text + json.dumps(record, sort_keys=True) + "\n")


def read(workdir) -> list[dict]:
  """The records of WORKDIR/config_history.jsonl, oldest first ([] if none)."""
  path = storage.as_path(workdir) / HISTORY_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
