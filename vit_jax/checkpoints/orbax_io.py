"""Orbax directories: parameters alone, and whole train states with a data-iterator state.

Layout of a `TrainCheckpointer` directory (one Orbax `CheckpointManager`):
  DIR/<step>/state/   the train state (any pytree of jax.Arrays), StandardSave
  DIR/<step>/data/    the data iterator's JSON state, JsonSave (when given)
A step directory is written under a temporary name and renamed when complete, so a
process killed mid-save leaves the previous checkpoints untouched and `latest_step()`
never sees the partial one (Orbax removes such `<step>.orbax-checkpoint-tmp*` leftovers
when the manager opens).

`restore_newest` resumes past damage: when the newest step cannot be restored (a file
truncated, deleted or overwritten), it tries the older ones, moves every newer step that
failed aside to `DIR/<step>.damaged-<time>` (never deleted: Orbax no longer lists it) and
returns the newest that restored; if none does, nothing is moved and the error lists
every step tried with its reason.
"""

import datetime
import re
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vit_jax.checkpoints.arrays import place_like
from vit_jax.checkpoints.errors import CheckpointError

_STATE, _DATA = "state", "data"


def _abs(directory) -> epath.Path:
  path = epath.Path(directory)
  return path if str(path).startswith(("gs://", "s3://")) else path.resolve()


def save_params(directory, params, *, force: bool = False) -> None:
  """Writes a params pytree as one Orbax checkpoint directory (sharded arrays welcome)."""
  path = _abs(directory)
  if path.exists() and not force:
    raise FileExistsError(f"{path} already exists; pass force=True to overwrite it.")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params, force=force)
    checkpointer.wait_until_finished()


def _step_dirs(path: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name))


def _resolve(path: epath.Path) -> tuple[epath.Path, bool]:
  """(the directory holding the params, whether they sit in a train state's 'params')."""
  if (path / _STATE).is_dir():
    return path / _STATE, True
  steps = _step_dirs(path)
  if steps:
    return path / str(steps[-1]) / _STATE, True
  return path, False


def _numpy_restore(path: epath.Path):
  """Everything in a StandardSave/PyTreeSave directory as numpy arrays, any device count."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def restore_params(directory, target=None):
  """Params from an Orbax directory.

  `directory` may be a `save_params` directory, a TrainCheckpointer directory (its
  latest step) or one step of it (the state's `params`). With `target` (a pytree of
  jax.ShapeDtypeStruct with `.sharding`, or of arrays) the arrays are restored onto its
  layout, whatever layout they were saved from; without it, as numpy arrays on the host.
  """
  root = _abs(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"No Orbax checkpoint directory at {root}.")
  path, in_state = _resolve(root)
  try:
    if target is None or in_state:
      tree = _numpy_restore(path)
      params = tree["params"] if in_state else tree
      if target is not None:
        params = jax.tree.map(place_like, params, target)
      return params
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path, jax.tree.map(_abstract, target))
  except (FileNotFoundError, CheckpointError):
    raise
  except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
    raise CheckpointError(_damaged_message(path, e)) from e


def _abstract(leaf):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))


def _damaged_message(path, error) -> str:
  return (f"Could not restore the Orbax checkpoint at {path}: {type(error).__name__}: "
          f"{str(error)[:500]}\nThe directory is damaged or incomplete (a file missing, "
          "truncated or overwritten), or the target tree does not match what was saved. "
          "Use an earlier step, or re-copy the checkpoint.")


def _reason(error: CheckpointError) -> str:
  """The first line of a restore error, without the advice that follows it."""
  return str(error).split("\n")[0].replace("Could not restore the Orbax checkpoint at ", "")


def _everywhere_ok(ok: bool) -> bool:
  """True when `ok` on every process (one all-gather with several processes)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class TrainCheckpointer:
  """Train state + data-iterator state per step, keeping the last k and the best.

  Args:
    directory: where the step directories go (local or any etils.epath path).
    max_to_keep: the most recent checkpoints kept.
    keep_best: also keep the checkpoint with the best `best_metric` (from the `metrics`
      given to `save`), even when it is older than the last `max_to_keep`.
    best_metric / best_mode: the metric name and 'max' (accuracy) or 'min' (loss).
    async_save: write in a background thread; `save` returns once the arrays are copied
      off the devices. Call `wait()` (or `close()`) before reading the files.
  """

  def __init__(self, directory, *, max_to_keep: int = 3, keep_best: bool = True,
               best_metric: str = "accuracy", best_mode: str = "max",
               async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}.")
    self.directory = _abs(directory)
    self.best_metric, self.best_mode = best_metric, best_mode
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=self._metric, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=self._metric if keep_best else None, best_mode=best_mode,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(timeout_secs=3600))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _DATA: ocp.JsonCheckpointHandler()})

  def _metric(self, metrics) -> float:
    """The ranking value; a checkpoint without the metric ranks worst."""
    value = metrics.get(self.best_metric)
    if value is None:
      return float("inf") if self.best_mode == "min" else float("-inf")
    return float(value)

  def save(self, step: int, state, *, data_state=None, metrics: Optional[dict] = None,
           force: bool = False) -> bool:
    """Starts saving `state` (and `data_state`) as step `step`; True if a save started."""
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_state is not None:
      items[_DATA] = ocp.args.JsonSave(data_state)
    if metrics is not None:
      metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
    return self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics,
                              force=force)

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None (a save in progress or killed does not count)."""
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return list(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    """The kept step with the best `best_metric` (ties: the latest), or None."""
    scored = [(self._metric(self._manager.metrics(step) or {}), step)
              for step in self.all_steps()]
    scored = [(-m if self.best_mode == "min" else m, step) for m, step in scored
              if np.isfinite(m)]
    return max(scored)[1] if scored else None

  def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, Any]:
    """(state, data_state) of `step` (default: the latest) on `abstract_state`'s layout.

    `abstract_state`: the state's pytree of jax.ShapeDtypeStruct with `.sharding`; the
    saved arrays are resharded onto it (e.g. saved over 8 devices, restored on 1).
    `data_state` is None when the step was saved without one.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    step_dir = self.directory / str(step)
    if not step_dir.is_dir():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}.")
    items = {_STATE: ocp.args.StandardRestore(jax.tree.map(_abstract, abstract_state))}
    has_data = (step_dir / _DATA).exists()
    if has_data:
      items[_DATA] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
      raise CheckpointError(_damaged_message(step_dir, e)) from e
    return restored[_STATE], restored[_DATA] if has_data else None

  def restore_newest(self, abstract_state, *, say=print):
    """(state, data_state, step) of the newest step that restores, or None if there is none.

    Steps newer than it that failed are moved aside (see the module docstring) and the
    manager's step list reloaded, so the next save of those steps starts clean.
    CheckpointError listing every step tried when none restores.
    """
    failed = []  # (step, reason)
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(abstract_state, step)
        error = None
      except CheckpointError as e:
        error = e
      if not _everywhere_ok(error is None):
        failed.append((step, _reason(error) if error else "failed on another process"))
        continue
      for bad_step, reason in failed:
        aside = self.move_aside(bad_step)
        say(f"The checkpoint at step {bad_step} cannot be restored ({reason}); moved it to "
            f"{aside} (kept, not deleted). Resuming from step {step} instead.")
      return state, data_state, step
    if failed:
      tried = "\n  ".join(f"step {s}: {r}" for s, r in failed)
      raise CheckpointError(
          f"No checkpoint in {self.directory} can be restored; tried (newest first):\n  "
          f"{tried}\nIf the config changed since they were written, set it back; else the "
          "files are damaged: re-copy them, or move the step directories away to start "
          "from scratch.")
    return None

  def move_aside(self, step: int) -> epath.Path:
    """Renames DIR/<step> to DIR/<step>.damaged-<time> (process 0) and reloads the list."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = self.directory / f"{int(step)}.damaged-{stamp}"
    if jax.process_index() == 0:
      (self.directory / str(int(step))).rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"vit_jax_move_aside_{int(step)}")
    self._manager.reload()
    return aside

  def wait(self) -> None:
    """Blocks until a pending async save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
