"""The training loop: from scratch or fine-tuning, resumable, evaluated, reported.

`train_and_evaluate(config, workdir)` checks the config against the devices, builds the
model, state and input pipeline, resumes from the newest checkpoint in `workdir` (or starts
from `config.init_from`), trains to `config.total_steps` with evaluation and checkpoints
every N steps, and leaves metrics, plots and the final parameters in `workdir`.
SIGTERM (preemption) saves a checkpoint and returns; a NaN loss stops the run with
`TrainingDivergedError` and keeps the last good checkpoint. A config with an `mpp` field
runs self-supervised masked patch prediction instead of classification (`vit_jax/mpp.py`).
"""

import os
import signal
import threading
import time

import jax
import numpy as np

from vit_jax import checkpoint
from vit_jax import data
from vit_jax import models
from vit_jax import mpp
from vit_jax import optim
from vit_jax import reporting
from vit_jax import sharding
from vit_jax import train

CHECKPOINT_DIR = "checkpoints"
PARAMS_DIR = "params"  # The final parameters, for `init_from=<this workdir>` or inference.


class TrainingDivergedError(RuntimeError):
  """The loss (or gradient norm) became NaN or infinite."""


# --------------------------------------------------------------------------- checks


def resolve_init_from(path: str) -> str:
  """The .npz file or Orbax params directory that `config.init_from` names.

  A workdir of an earlier run stands for its exported final parameters (`<workdir>/params`),
  or, if it has not finished, for the parameters of its latest checkpoint.
  """
  expanded = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(expanded):
    raise FileNotFoundError(
        f"config.init_from={path!r} does not exist ({expanded}). Give a published .npz "
        "checkpoint (e.g. gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .), an Orbax "
        "params directory, or the workdir of a finished run; or unset it "
        "(--config.init_from=None) to train from scratch.")
  if os.path.isdir(expanded) and os.path.isdir(os.path.join(expanded, PARAMS_DIR)):
    return os.path.join(expanded, PARAMS_DIR)
  if os.path.isdir(expanded) and os.path.isdir(os.path.join(expanded, CHECKPOINT_DIR)):
    return os.path.join(expanded, CHECKPOINT_DIR)  # An unfinished run: its latest step.
  return expanded


def make_mesh(config):
  """The device mesh of `config.mesh`, with the config field named in any error."""
  try:
    return sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise ValueError(f"config.mesh={config.mesh!r} does not fit the {jax.device_count()} "
                     f"devices ({jax.devices()[0].platform}): {e} Set e.g. "
                     "--config.mesh=\"(('data', -1),)\".") from e


def check_batch_sizes(config, mesh) -> None:
  """Batches must split evenly over the data-parallel devices (and accumulation steps)."""
  shards = sharding.num_batch_shards(mesh)
  accum = int(config.get("accum_steps", 1) or 1)
  for field, size, parts in (("batch_size", config.batch_size, shards * accum),
                             ("eval_batch_size", config.eval_batch_size, shards)):
    if size <= 0 or size % parts:
      what = f"{shards} data-parallel devices" + (f" x {accum} accum_steps"
                                                   if field == "batch_size" and accum > 1 else "")
      lower, upper = (size // parts) * parts, -(-size // parts) * parts
      suggestion = " or ".join(str(s) for s in sorted({lower, upper}) if s > 0)
      raise ValueError(f"config.{field}={size} is not divisible by the {what} "
                       f"(mesh {dict(mesh.shape)}). Use a multiple of {parts}, "
                       f"e.g. --config.{field}={suggestion}.")


def check_config(config) -> None:
  """Value checks that need no devices."""
  for field in ("total_steps", "log_every", "checkpoint_every"):
    if int(config[field]) <= 0:
      raise ValueError(f"config.{field}={config[field]} must be positive.")
  if int(config.eval_every) < 0:
    raise ValueError(f"config.eval_every={config.eval_every} must be >= 0 (0 = only at the end).")
  optim.make_optimizer(config)  # Its own checks (schedule, optimizer name, ...), early.


# --------------------------------------------------------------------------- preemption


class PreemptionWatcher:
  """Turns SIGTERM into a flag that every process agrees on at the same step.

  Single-process: checked every step. Multi-process: the flags are combined with an
  all-gather every `sync_every` steps, so all processes stop (and save) at the same step.
  """

  def __init__(self, sync_every: int = 10):
    self.requested = False
    self._sync_every = max(1, int(sync_every))
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      # Restart interrupted system calls: a signal landing inside a blocking collective
      # (gloo/TCP on CPU) must not break it on this process only.
      signal.siginterrupt(signal.SIGTERM, False)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % self._sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------- pieces


def _initial_state(config, model, mesh, init_path, report):
  """A fresh TrainState, with the pre-trained parameters when `init_path` is set."""
  rng = jax.random.PRNGKey(config.seed)
  state, shardings = train.create_train_state(config, model, mesh, rng=rng)
  if init_path is None:
    return state, shardings
  report.info(f"Initialising from {init_path} (fresh head, position embeddings resampled "
              f"to the {config.model.image_size} px grid if needed).")
  params = checkpoint.load_pretrained(init_path, train.to_host(state.params), config.model,
                                      resample=config.get("resample_posemb", "zoom"))
  del state
  return train.create_train_state(config, model, mesh, rng=rng, init_params=params)


def evaluate(eval_step, params, config, mesh) -> dict:
  """Top-1 / top-5 accuracy and mean loss over the whole eval split (padding masked)."""
  iterator = data.make_eval_iterator(config)
  totals = None
  try:
    for batch in data.prefetch_to_mesh(iterator, mesh, size=config.get("prefetch", 2),
                                       batch_axes=sharding.batch_axes(mesh)):
      sums = eval_step(params, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  finally:
    iterator.close()
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count,
          "accuracy_top5": totals["correct_top5"] / count,
          "loss": totals["loss_sum"] / count,
          "num_examples": int(totals["count"])}


class _MetricsBuffer:
  """Training metrics kept on the device until a log/check point, then checked for NaN."""

  def __init__(self):
    self._pending = []  # (step, device metrics)
    self._host = []  # host metrics since the last report

  def add(self, step, metrics):
    self._pending.append((step, metrics))

  def check(self):
    """Fetches pending metrics; raises TrainingDivergedError at the first non-finite step."""
    fetched = jax.device_get(self._pending)
    self._pending = []
    for step, metrics in fetched:
      bad = {k: float(v) for k, v in metrics.items()
             if k in ("loss", "grad_norm") and not np.isfinite(v)}
      if bad:
        raise TrainingDivergedError(step, bad, float(metrics.get("learning_rate", np.nan)))
      self._host.append({k: float(v) for k, v in metrics.items()})

  def mean_and_reset(self) -> dict:
    keys = self._host[0].keys() if self._host else ()
    mean = {k: float(np.mean([m[k] for m in self._host])) for k in keys}
    # The learning rate of the last step, not the mean over the interval.
    if self._host and "learning_rate" in self._host[-1]:
      mean["learning_rate"] = self._host[-1]["learning_rate"]
    self._host = []
    return mean


def _diverged_error(err: TrainingDivergedError, ckpt, ckpt_dir) -> TrainingDivergedError:
  step, bad, lr = err.args
  last = ckpt.latest_step()
  kept = (f"The last good checkpoint is step {last} in {ckpt_dir}; rerunning resumes from it."
          if last is not None else "No checkpoint was saved before it.")
  values = ", ".join(f"{k}={v}" for k, v in bad.items())
  return TrainingDivergedError(
      f"Training diverged at step {step}: {values} (learning rate {lr:.3g}). Stopped. {kept} "
      "Lower config.lr, raise config.warmup_steps or keep config.grad_clip_norm on.")


def _export_params(params, workdir, config) -> str:
  """Saves the final parameters; for MPP the encoder's (what fine-tuning starts from)."""
  path = os.path.join(os.path.abspath(workdir), PARAMS_DIR)
  checkpoint.save_params(path, params["vit"] if _is_mpp(config) else params, force=True)
  return path


def _is_mpp(config) -> bool:
  return config.get("mpp", None) is not None


def _make_model(config, num_classes):
  if _is_mpp(config):
    return mpp.create_model(config)
  return models.from_config(config.model, num_classes)


def _make_steps(config, model, mesh, shardings):
  """(train_step, eval_step) of the config's objective: classification or MPP."""
  if _is_mpp(config):
    return (mpp.make_mpp_train_step(config, model, mesh, shardings),
            mpp.make_mpp_eval_step(config, model, mesh, shardings))
  return (train.make_train_step(config, model, mesh, shardings),
          train.make_eval_step(config, model, mesh, shardings))


# --------------------------------------------------------------------------- the loop


class _Loop:
  """One run's state and pieces; `run()` trains from the current step to total_steps."""

  def __init__(self, config, workdir, mesh, model, report, ckpt, train_iter, state,
               shardings, resume_step):
    self.config, self.workdir, self.mesh, self.report, self.ckpt = (
        config, workdir, mesh, report, ckpt)
    self.state = state
    self.total = int(config.total_steps)
    self.step = int(jax.device_get(state.step))
    self.train_step, self.eval_step = _make_steps(config, model, mesh, shardings)
    self.batches = data.prefetch_to_mesh(train_iter, mesh, size=config.get("prefetch", 2),
                                         batch_axes=sharding.batch_axes(mesh))
    self.buffer = _MetricsBuffer()
    self.eval_metrics = None
    self.best = _best_so_far(workdir, resume_step or 0)  # (accuracy, step)
    self.last_saved = resume_step
    self.preempted = False

  def evaluate(self):
    self.eval_metrics = evaluate(self.eval_step, self.state.params, self.config, self.mesh)
    self.report.eval(self.step, self.eval_metrics, split=self.config.get("eval_split", "test"))
    if self.best[0] is None or self.eval_metrics["accuracy"] > self.best[0]:
      self.best = (self.eval_metrics["accuracy"], self.step)
    self.report.pause_clock(self.step)

  def save(self, metrics=None, force=False):
    if self.last_saved != self.step:
      self.ckpt.save(self.step, self.state, data_state=self.batches.get_state(),
                     metrics=metrics, force=force)
      self.last_saved = self.step

  def _after_step(self):
    """Logging, evaluation and checkpointing that fall due at this step."""
    c, step, last = self.config, self.step, self.step == self.total
    due_log = step % c.log_every == 0 or last
    due_eval = (c.eval_every and step % c.eval_every == 0) or last
    due_ckpt = step % c.checkpoint_every == 0 or last
    if due_log or due_eval or due_ckpt:
      self.buffer.check()  # Never evaluate or checkpoint a diverged state.
    if due_log:
      self.report.train(step, self.buffer.mean_and_reset())
    if due_eval:
      self.evaluate()
    if due_ckpt:
      # {} rather than None: Orbax warns on every save without metrics.
      self.save(metrics=self.eval_metrics if due_eval else {}, force=last)

  def run(self):
    """Trains to total_steps, or until SIGTERM (then saves); waits for the last save."""
    watcher = PreemptionWatcher(self.config.get("preemption_sync_every", 10))
    finished_before = self.step >= self.total
    try:
      while self.step < self.total:
        if watcher.should_stop(self.step):
          self.preempted = True
          break
        self.state, metrics = self.train_step(self.state, next(self.batches))
        self.step += 1
        self.buffer.add(self.step, metrics)
        self._after_step()
      if self.preempted:
        self.buffer.check()
        self.report.info(f"Preemption (SIGTERM): saving a checkpoint at step {self.step} "
                         "and stopping.")
        self.save(force=True)
      elif finished_before:
        self.evaluate()  # Nothing left to train: report the finished run's accuracy.
      self.ckpt.wait()
    except TrainingDivergedError as e:
      self.ckpt.wait()
      raise _diverged_error(e, self.ckpt, str(self.ckpt.directory)) from None
    finally:
      watcher.restore()


def _best_so_far(workdir, up_to_step) -> tuple:
  """(best eval accuracy, its step) logged by earlier runs in `workdir` up to a step."""
  evals = [r for r in reporting.read_metrics(workdir)
           if r.get("kind") == "eval" and r["step"] <= up_to_step and "accuracy" in r]
  if not evals or jax.process_index() != 0:
    return (None, None)
  best = max(evals, key=lambda r: r["accuracy"])
  return (best["accuracy"], best["step"])


def _for_this_process(data_state):
  """The checkpoint holds process 0's iterator state. Every process has read the same
  number of batches from its own slice of the data, so the states differ only in the
  process index (checked again by `set_state`)."""
  pipeline = data_state.get("pipeline") if isinstance(data_state, dict) else None
  if pipeline is None or jax.process_count() == 1:
    return data_state
  return dict(data_state, pipeline=dict(pipeline, process_index=jax.process_index()))


def _start_or_resume(config, model, mesh, ckpt, train_iter, init_path, report):
  """(state, shardings, resume_step): the newest checkpoint, else a fresh/pre-trained state."""
  resume_step = ckpt.latest_step()
  if resume_step is None:
    state, shardings = _initial_state(config, model, mesh, init_path, report)
    return state, shardings, None
  abstract = train.abstract_train_state(config, model, mesh)
  state, data_state = ckpt.restore(abstract)
  if data_state is not None:
    train_iter.set_state(_for_this_process(data_state))
  report.info(f"Resumed from the checkpoint at step {resume_step} in {ckpt.directory}.")
  return state, jax.tree.map(lambda a: a.sharding, abstract), resume_step


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns a summary.

  The summary holds 'step', 'accuracy', 'accuracy_top5', 'eval_loss', 'best_accuracy',
  'best_step', 'wall_time_s', 'workdir', 'checkpoint_dir', 'params_dir', 'preempted',
  'plots'.
  """
  start_time = time.perf_counter()
  config = config.copy_and_resolve_references()
  check_config(config)
  mesh = make_mesh(config)
  check_batch_sizes(config, mesh)
  # On the command line --config.init_from=None arrives as the string 'None'.
  from_scratch = config.get("init_from") in (None, "", "None", "none")
  if _is_mpp(config) and not from_scratch:
    raise ValueError("Masked patch prediction (config.mpp) pre-trains from scratch; set "
                     "--config.init_from=None, or drop config.mpp to fine-tune a classifier.")
  init_path = None if from_scratch else resolve_init_from(config.init_from)
  workdir = os.path.abspath(workdir)

  info = data.get_info(config)
  num_classes = config.num_classes or info.num_classes
  model = _make_model(config, num_classes)
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                      max_to_keep=config.keep_checkpoints, keep_best=True,
                                      best_metric="accuracy",
                                      async_save=config.async_checkpoint)
  report = reporting.Reporter(workdir, total_steps=config.total_steps,
                              batch_size=config.batch_size,
                              start_step=ckpt.latest_step() or 0,
                              is_main=jax.process_index() == 0,
                              progress_bar=config.get("progress_bar", False))
  report.write_config(config)
  task = "masked patch prediction" if _is_mpp(config) else f"{num_classes} classes"
  report.info(f"Workdir {workdir}: {config.model.name} ({task}, "
              f"{config.model.image_size} px) on {info.name}, {jax.device_count()} "
              f"{jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}, "
              f"{jax.process_count()} process(es).")
  train_iter = data.make_train_iterator(config, seed=config.seed)
  try:
    state, shardings, resume_step = _start_or_resume(config, model, mesh, ckpt, train_iter,
                                                     init_path, report)
    loop = _Loop(config, workdir, mesh, model, report, ckpt, train_iter, state, shardings,
                 resume_step)
    loop.run()
  finally:
    train_iter.close()
    ckpt.close()
    report.close()

  params_dir, plots = None, []
  if not loop.preempted:
    params_dir = _export_params(loop.state.params, workdir, config)
    if config.get("plots", True):
      plots = report.plot()
  metrics = loop.eval_metrics or {}
  summary = {
      "step": loop.step, "accuracy": metrics.get("accuracy"),
      "accuracy_top5": metrics.get("accuracy_top5"), "eval_loss": metrics.get("loss"),
      "best_accuracy": loop.best[0], "best_step": loop.best[1],
      "wall_time_s": time.perf_counter() - start_time,
      "workdir": workdir, "checkpoint_dir": str(ckpt.directory), "params_dir": params_dir,
      "preempted": loop.preempted, "plots": plots,
  }
  _print_summary(report, summary, config.total_steps)
  return summary


def _print_summary(report, summary, total):
  if summary["preempted"]:
    report.info(f"Stopped at step {summary['step']}/{total} after "
                f"{reporting.format_duration(summary['wall_time_s'])}; checkpoint in "
                f"{summary['checkpoint_dir']}. Rerun the same command to resume.")
    return
  lines = [f"Done: {summary['step']} steps in {reporting.format_duration(summary['wall_time_s'])}."]
  if summary["accuracy"] is not None:
    lines.append(f"  final accuracy {summary['accuracy']:.4f} (top-5 "
                 f"{summary['accuracy_top5']:.4f}, loss {summary['eval_loss']:.4f}); best "
                 f"{summary['best_accuracy']:.4f} at step {summary['best_step']}")
  lines.append(f"  checkpoints: {summary['checkpoint_dir']}")
  lines.append(f"  final parameters: {summary['params_dir']} "
               "(use as --config.init_from to fine-tune)")
  lines.append(f"  metrics: {os.path.join(summary['workdir'], reporting.METRICS_FILE)}, "
               f"TensorBoard: {os.path.join(summary['workdir'], reporting.TENSORBOARD_DIR)}")
  if summary["plots"]:
    lines.append(f"  plots: {', '.join(summary['plots'])}")
  report.info("\n".join(lines))
