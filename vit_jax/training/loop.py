"""The training run: from scratch or fine-tuning, resumable, evaluated, reported.

`train_and_evaluate(config, workdir)` checks the config, builds the objective's model,
the state and the input pipeline, resumes from the newest checkpoint in `workdir` (or
starts from `config.init_from`), trains to `config.total_steps` with evaluation and
checkpoints every N steps, and leaves metrics, plots and the exported parameters in
`workdir` (layout: training/workdir.py). SIGTERM (preemption) saves a checkpoint and
returns; a NaN loss stops the run with `TrainingDivergedError` and keeps the last good
checkpoint. What is learned (classification, masked patch prediction) is the
`config.objective` (training/objectives/); this module names none of them.
"""

import time

import jax
import numpy as np

from vit_jax import checkpoints
from vit_jax import data
from vit_jax import storage
from vit_jax.data import sources as data_sources
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.training import config_check
from vit_jax.training import objectives
from vit_jax.training import optim
from vit_jax.training import reporting
from vit_jax.training import state as state_lib
from vit_jax.training import workdir as workdir_lib
from vit_jax.training.preemption import PreemptionWatcher


class TrainingDivergedError(RuntimeError):
  """The loss (or gradient norm) became NaN or infinite."""


class _Run:
  """What one run is made of: its config, mesh, objective and model, and their builders."""

  def __init__(self, config, mesh, objective, model):
    self.config, self.mesh, self.objective, self.model = config, mesh, objective, model
    self.tx = optim.make_optimizer(config)
    self.layout = state_lib.layout_options(config)

  def initial_state(self, init_path, report):
    """A fresh TrainState, with the pre-trained parameters when `init_path` is set."""
    rng = jax.random.PRNGKey(self.config.seed)
    state, shardings = state_lib.create_train_state(self.model, self.tx, self.mesh, rng=rng,
                                                    **self.layout)
    if init_path is None:
      return state, shardings
    report.info(f"Initialising from {init_path} (fresh head, position embeddings resampled "
                f"to the {self.config.model.image_size} px grid if needed).")
    params = checkpoints.load_pretrained(init_path, checkpoints.to_host(state.params),
                                         self.config.model, resample=self.config.resample_posemb)
    del state
    return state_lib.create_train_state(self.model, self.tx, self.mesh, rng=rng,
                                        init_params=params, **self.layout)

  def abstract_state(self):
    return state_lib.abstract_train_state(self.model, self.tx, self.mesh, **self.layout)

  def steps(self, state_shardings):
    """(train_step, eval_step) of the objective."""
    args = (self.objective, self.config, self.model, self.mesh, state_shardings)
    return objectives.make_train_step(*args), objectives.make_eval_step(*args)

  def prefetch(self, iterator):
    return data.prefetch_to_mesh(iterator, self.mesh, size=self.config.prefetch,
                                 batch_axes=mesh_lib.batch_axes(self.mesh))


def evaluate(run: _Run, eval_step, params) -> dict:
  """Top-1 / top-5 accuracy and mean loss over the whole eval split (padding masked)."""
  iterator = data.make_eval_iterator(run.config)
  totals = None
  try:
    for batch in run.prefetch(iterator):
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
        raise TrainingDivergedError(step, bad, float(metrics["learning_rate"]))
      self._host.append({k: float(v) for k, v in metrics.items()})

  def mean_and_reset(self) -> dict:
    keys = self._host[0].keys() if self._host else ()
    mean = {k: float(np.mean([m[k] for m in self._host])) for k in keys}
    # The learning rate of the last step, not the mean over the interval.
    if self._host and "learning_rate" in self._host[-1]:
      mean["learning_rate"] = self._host[-1]["learning_rate"]
    self._host = []
    return mean


def _diverged_error(err: TrainingDivergedError, ckpt) -> TrainingDivergedError:
  step, bad, lr = err.args
  last = ckpt.latest_step()
  kept = (f"The last good checkpoint is step {last} in {ckpt.directory}; rerunning resumes "
          "from it." if last is not None else "No checkpoint was saved before it.")
  values = ", ".join(f"{k}={v}" for k, v in bad.items())
  return TrainingDivergedError(
      f"Training diverged at step {step}: {values} (learning rate {lr:.3g}). Stopped. {kept} "
      "Lower config.lr, raise config.warmup_steps or keep config.grad_clip_norm on.")


class _Loop:
  """One run's moving parts; `run()` trains from the current step to total_steps."""

  def __init__(self, run: _Run, workdir, report, ckpt, train_iter, state, shardings,
               resume_step):
    self.config, self.report, self.ckpt = run.config, report, ckpt
    self.run_parts = run
    self.state = state
    self.total = int(run.config.total_steps)
    self.step = int(jax.device_get(state.step))
    self.train_step, self.eval_step = run.steps(shardings)
    self.batches = run.prefetch(train_iter)
    self.buffer = _MetricsBuffer()
    self.eval_metrics = None
    self.best = _best_so_far(workdir, resume_step or 0)  # (accuracy, step)
    self.last_saved = resume_step
    self.preempted = False

  def evaluate(self):
    self.eval_metrics = evaluate(self.run_parts, self.eval_step, self.state.params)
    self.report.eval(self.step, self.eval_metrics, split=self.config.eval_split)
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
    watcher = PreemptionWatcher(self.config.preemption_sync_every)
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
      raise _diverged_error(e, self.ckpt) from None
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


def _start_or_resume(run: _Run, ckpt, train_iter, init_path, report):
  """(state, shardings, resume_step): the newest checkpoint, else a fresh/pre-trained state."""
  resume_step = ckpt.latest_step()
  if resume_step is None:
    state, shardings = run.initial_state(init_path, report)
    return state, shardings, None
  abstract = run.abstract_state()
  state, data_state = ckpt.restore(abstract)
  if data_state is not None:
    train_iter.set_state(_for_this_process(data_state))
  report.info(f"Resumed from the checkpoint at step {resume_step} in {ckpt.directory}.")
  return state, jax.tree.map(lambda a: a.sharding, abstract), resume_step


def _prepare(config):
  """(run, init_path, dataset info, num_classes): the config checked, the mesh,
  objective and model built; nothing is written yet."""
  config_check.check_config(config)
  mesh = config_check.make_mesh(config)
  config_check.check_config(config, mesh)
  init_path = (None if workdir_lib.is_from_scratch(config.init_from)
               else workdir_lib.resolve_init_from(config.init_from, config.pretrained_root))
  objective = objectives.get(config)
  info = data.get_info(config)
  num_classes = config.num_classes or info.num_classes
  model = objective.create_model(config, num_classes)
  return _Run(config, mesh, objective, model), init_path, info, num_classes


def _check_storage(config, workdir) -> None:
  """Fails within seconds, naming the path, if a gs:// workdir or data_dir cannot be used
  (init_from is probed where it is resolved), before Orbax or tensorstore touch it."""
  storage.check_reachable(workdir, "workdir")
  storage.check_dataset_dir(data_sources.data_dir_of(config))


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns a summary.

  The summary holds 'step', 'accuracy', 'accuracy_top5', 'eval_loss', 'best_accuracy',
  'best_step', 'wall_time_s', 'workdir', 'checkpoint_dir', 'params_dir', 'preempted',
  'plots'.
  """
  start_time = time.perf_counter()
  config = config.copy_and_resolve_references()
  if workdir_lib.is_from_scratch(config.init_from):
    config.init_from = None
  _check_storage(config, workdir)
  run, init_path, info, num_classes = _prepare(config)
  workdir = workdir_lib.resolve(workdir)
  ckpt = checkpoints.TrainCheckpointer(
      workdir_lib.file(workdir, workdir_lib.CHECKPOINT_DIR),
      max_to_keep=config.keep_checkpoints, keep_best=True, best_metric="accuracy",
      async_save=config.async_checkpoint)
  report = reporting.Reporter(workdir, total_steps=config.total_steps,
                              batch_size=config.batch_size,
                              start_step=ckpt.latest_step() or 0,
                              is_main=jax.process_index() == 0,
                              progress_bar=config.progress_bar)
  report.write_config(config)
  report.info(f"Workdir {workdir}: {config.model.name} ({run.objective.describe(num_classes)}, "
              f"{config.model.image_size} px) on {info.name}, {jax.device_count()} "
              f"{jax.devices()[0].platform} devices, mesh {dict(run.mesh.shape)}, "
              f"{jax.process_count()} process(es).")
  train_iter = data.make_train_iterator(config, seed=config.seed)
  try:
    state, shardings, resume_step = _start_or_resume(run, ckpt, train_iter, init_path, report)
    loop = _Loop(run, workdir, report, ckpt, train_iter, state, shardings, resume_step)
    loop.run()
  finally:
    train_iter.close()
    ckpt.close()
    report.close()
  return _finish(run, loop, workdir, report, ckpt, time.perf_counter() - start_time)


def _finish(run, loop, workdir, report, ckpt, wall_time_s) -> dict:
  """Exports the parameters and plots (unless preempted); prints and returns the summary."""
  params_dir, plots = None, []
  if not loop.preempted:
    params_dir = workdir_lib.file(workdir, workdir_lib.PARAMS_DIR)
    checkpoints.save_params(params_dir, run.objective.exported_params(loop.state.params),
                            force=True)
    if run.config.plots:
      plots = report.plot()
  metrics = loop.eval_metrics or {}
  summary = {
      "step": loop.step, "accuracy": metrics.get("accuracy"),
      "accuracy_top5": metrics.get("accuracy_top5"), "eval_loss": metrics.get("loss"),
      "best_accuracy": loop.best[0], "best_step": loop.best[1], "wall_time_s": wall_time_s,
      "workdir": workdir, "checkpoint_dir": str(ckpt.directory), "params_dir": params_dir,
      "preempted": loop.preempted, "plots": plots,
  }
  _print_summary(report, summary, run.config.total_steps)
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
  workdir = summary["workdir"]
  lines.append(f"  metrics: {workdir_lib.file(workdir, workdir_lib.METRICS_FILE)}, "
               f"TensorBoard: {workdir_lib.file(workdir, workdir_lib.TENSORBOARD_DIR)}")
  if summary["plots"]:
    lines.append(f"  plots: {', '.join(summary['plots'])}")
  report.info("\n".join(lines))
