"""The training run: from scratch or fine-tuning, resumable, evaluated, reported.

`train_and_evaluate(config, workdir)` checks the config, builds the objective's model,
the state and the input pipeline, resumes from the newest checkpoint in `workdir` (or
starts from `config.init_from`), trains to `config.total_steps` with evaluation and
checkpoints every N steps, and leaves metrics, plots and the exported parameters in
`workdir` (layout: training/workdir.py). SIGTERM (preemption) saves a checkpoint and
returns (`summary['preempted']`; `python -m vit_jax.main` then exits with
PREEMPTED_EXIT_CODE); a SIGTERM during start-up stops before the first step with
`PreemptedError`, nothing saved. A NaN loss stops the run with `TrainingDivergedError`
and keeps the last good checkpoint. What is learned (classification, masked patch
prediction) is the `config.objective` (training/objectives/); this module names none.

Start-up order, so that a bad input stops before anything is written: the config, the
workdir and the data's classes are checked (config_check.check_start), a resume's config
is compared with the saved one (config_history), then the workdir is locked (lock.py),
and only then are the model, the checkpoint manager and the input pipeline built and the
newest checkpoint that restores is loaded (damaged newer ones are moved aside).
"""

import time

import jax

from vit_jax import checkpoints
from vit_jax import data
from vit_jax import storage
from vit_jax.data import sources as data_sources
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.training import config_check
from vit_jax.training import divergence
from vit_jax.training.divergence import TrainingDivergedError
from vit_jax.training import config_history
from vit_jax.training import lock as lock_lib
from vit_jax.training import evaluators as evaluators_lib
from vit_jax.training import objectives
from vit_jax.training import optim
from vit_jax.training import reporting
from vit_jax.training import state as state_lib
from vit_jax.training import preemption
from vit_jax.training import workdir as workdir_lib
from vit_jax.training.preemption import PreemptionWatcher

# The exit status of a preempted run (SIGTERM; a checkpoint was saved if any step ran):
# EX_TEMPFAIL of sysexits.h, "try again later". launch/tpu.py restarts on it and
# launch/slurm.sh requeues the job; any other non-zero status is a failure.
PREEMPTED_EXIT_CODE = 75


class PreemptedError(RuntimeError):
  """SIGTERM during start-up: the run stopped before its first step, nothing saved."""


def _stop_if_preempted(phase: str) -> None:
  """PreemptedError if SIGTERM arrived (one process; several agree in the loop instead)."""
  if jax.process_count() == 1 and preemption.requested():
    raise PreemptedError(f"Preemption (SIGTERM) during start-up ({phase}): stopped before "
                         "the first step, nothing saved. Rerun the same command to start.")


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
                                         self.config.model, resample=self.config.resample_posemb,
                                         patch_resize=self.config.patch_resize)
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
  return evaluators_lib.split_metrics(run.config, run.config.eval_split, run.prefetch,
                                      eval_step, params)


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
    self.buffer = divergence.MetricsBuffer()
    self.eval_metrics = None
    self.evaluators = evaluators_lib.make_evaluators(run, self.eval_step, shardings, report)
    self.best_metric = run.config.best_metric
    self.best = _best_so_far(workdir, resume_step or 0, self.best_metric)  # (value, step)
    self.last_saved = resume_step
    self.preempted = False

  def evaluate(self, last=True):
    """Runs the evaluators due at this step (all when `last`); returns their metrics."""
    metrics = {}
    for evaluator in self.evaluators:
      if evaluator.due(self.step, last):
        result = evaluator.run(self.state)
        self.report.eval(self.step, result, split=evaluator.label)
        metrics.update(result)
    self.eval_metrics = {**(self.eval_metrics or {}), **metrics}
    value = metrics.get(self.best_metric)
    if value is not None and (self.best[0] is None or _better(value, self.best[0],
                                                              self.best_metric)):
      self.best = (value, self.step)
    self.report.pause_clock(self.step)
    return metrics

  def save(self, metrics=None, force=False):
    if self.last_saved != self.step:
      self.ckpt.save(self.step, self.state, data_state=self.batches.get_state(),
                     metrics=metrics, force=force)
      self.last_saved = self.step

  def _after_step(self):
    """Logging, evaluation and checkpointing that fall due at this step."""
    c, step, last = self.config, self.step, self.step == self.total
    due_log = step % c.log_every == 0 or last
    due_eval = any(e.due(step, last) for e in self.evaluators)
    due_ckpt = step % c.checkpoint_every == 0 or last
    if due_log or due_eval or due_ckpt:
      self.buffer.check()  # Never evaluate or checkpoint a diverged state.
    if due_log:
      self.report.train(step, self.buffer.mean_and_reset())
    metrics = self.evaluate(last) if due_eval else {}
    if due_ckpt:
      # {} rather than None: Orbax warns on every save without metrics.
      self.save(metrics=metrics, force=last)

  def run(self):
    """Trains to total_steps, or until SIGTERM (then saves); waits for the last save."""
    watcher = PreemptionWatcher(self.config.preemption_sync_every)
    finished_before = self.step >= self.total
    first_step = self.step
    try:
      while self.step < self.total:
        if watcher.should_stop(self.step):
          self.preempted = True
          break
        self.state, metrics = self.train_step(self.state, next(self.batches))
        self.step += 1
        self.buffer.add(self.step, metrics)
        self._after_step()
      if self.preempted and self.step == first_step:
        self.report.info(f"Preemption (SIGTERM) before the first step of this run (step "
                         f"{self.step}): nothing new to save; stopping.")
      elif self.preempted:
        self.buffer.check()
        self.report.info(f"Preemption (SIGTERM): saving a checkpoint at step {self.step} "
                         "and stopping.")
        self.save(force=True)
      elif finished_before:
        self.evaluate()  # Nothing left to train: report the finished run's accuracy.
      self.ckpt.wait()
    except TrainingDivergedError as e:
      self.ckpt.wait()
      raise divergence.diverged_error(e, self.ckpt) from None
    finally:
      watcher.restore()


def _better(value, best, metric) -> bool:
  if evaluators_lib.best_mode(metric) == "min":
    return value < best
  return value > best


def _best_so_far(workdir, up_to_step, metric="accuracy") -> tuple:
  """(best value of `metric`, its step) logged by earlier runs in `workdir` up to a step."""
  evals = [r for r in reporting.read_metrics(workdir)
           if r.get("kind") == "eval" and r["step"] <= up_to_step and metric in r]
  if not evals or jax.process_index() != 0:
    return (None, None)
  sign = -1.0 if evaluators_lib.best_mode(metric) == "min" else 1.0
  best = max(evals, key=lambda r: sign * r[metric])
  return (best[metric], best["step"])


def _for_this_process(data_state):
  """The checkpoint holds process 0's iterator state. Every process has read the same
  number of batches from its own slice of the data, so the states differ only in the
  process index (checked again by `set_state`)."""
  pipeline = data_state.get("pipeline") if isinstance(data_state, dict) else None
  if pipeline is None or jax.process_count() == 1:
    return data_state
  return dict(data_state, pipeline=dict(pipeline, process_index=jax.process_index()))


def _start_or_resume(run: _Run, ckpt, train_iter, init_path, say):
  """(state, shardings, resume_step): the newest checkpoint that restores, else a fresh or
  pre-trained state. Damaged newer checkpoints are moved aside (orbax_io.restore_newest)."""
  abstract = run.abstract_state()
  restored = ckpt.restore_newest(abstract, say=say)
  if restored is None:
    del abstract
    state, shardings = run.initial_state(init_path, say)
    return state, shardings, None
  state, data_state, resume_step = restored
  if data_state is not None:
    train_iter.set_state(_for_this_process(data_state))
  say(f"Resumed from the checkpoint at step {resume_step} in {ckpt.directory}.")
  return state, jax.tree.map(lambda a: a.sharding, abstract), resume_step


def _has_checkpoints(workdir) -> bool:
  """Whether WORKDIR/checkpoints holds a step directory (a listing; nothing is opened)."""
  directory = storage.as_path(workdir) / workdir_lib.CHECKPOINT_DIR
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _check(config, workdir):
  """(mesh, init_path, dataset info, warnings, config changes): every start-up check;
  nothing is written.

  ConfigError listing every problem of the config, the workdir and the data's classes;
  ConfigChangeError when resuming would change a field fixed by the checkpoint.
  """
  config_check._raise(config_check.problems(config) +  # pylint: disable=protected-access
                      config_check.workdir_problems(workdir))
  mesh = config_check.make_mesh(config)
  init_path = (None if workdir_lib.is_from_scratch(config.init_from)
               else workdir_lib.resolve_init_from(config.init_from, config.pretrained_root))
  info = data.get_info(config)
  warnings = config_check.check_start(config, workdir, mesh, info)
  changes = {}
  if _has_checkpoints(workdir):
    changes = config_history.check_resume(config_history.read_saved(workdir), config, workdir)
  return mesh, init_path, info, warnings, changes


def _prepare(config, mesh, info):
  """(run, num_classes): the objective and model built; nothing is written."""
  objective = objectives.get(config)
  num_classes = config.num_classes or info.num_classes
  model = objective.create_model(config, num_classes)
  return _Run(config, mesh, objective, model), num_classes


class _Say:
  """Prints a line on process 0 before the Reporter exists (then through it)."""

  def __init__(self):
    self.report = None

  def __call__(self, text):
    if self.report is not None:
      self.report.info(text)
    elif jax.process_index() == 0:
      print(text, flush=True)

  def info(self, text):
    self(text)


def _check_storage(config, workdir) -> None:
  """Fails within seconds, naming the path, if a gs:// workdir or data_dir cannot be used
  (init_from is probed where it is resolved), before Orbax or tensorstore touch it."""
  storage.check_reachable(workdir, "workdir")
  storage.check_dataset_dir(data_sources.data_dir_of(config))


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns a summary.

  The summary holds 'step', 'accuracy', 'accuracy_top5', 'eval_loss', 'best_accuracy'
  (the best value of `config.best_metric`, named in 'best_metric'), 'best_step',
  'wall_time_s', 'workdir', 'checkpoint_dir', 'params_dir', 'preempted', 'plots'.
  Raises ConfigError / ConfigChangeError / data.DataError / WorkdirLockedError before
  anything is written, PreemptedError for a SIGTERM during start-up, CheckpointError when
  no checkpoint of the workdir restores.
  """
  start_time = time.perf_counter()
  config = config.copy_and_resolve_references()
  if workdir_lib.is_from_scratch(config.init_from):
    config.init_from = None
  _check_storage(config, workdir)
  workdir = workdir_lib.resolve(workdir)
  checked = _check(config, workdir)
  _stop_if_preempted("checks")
  say = _Say()
  lock = lock_lib.acquire_for_run(workdir, stale_after_s=config.lock_stale_after_s,
                                  heartbeat_s=config.lock_heartbeat_s, report=say)
  try:
    return _locked_run(config, workdir, checked, say, start_time)
  finally:
    if lock is not None:
      lock.release()


def _locked_run(config, workdir, checked, say, start_time) -> dict:
  mesh, init_path, info, warnings, changes = checked
  run, num_classes = _prepare(config, mesh, info)
  _stop_if_preempted("building the model")
  ckpt = checkpoints.TrainCheckpointer(
      workdir_lib.file(workdir, workdir_lib.CHECKPOINT_DIR),
      max_to_keep=config.keep_checkpoints, keep_best=True, best_metric=config.best_metric,
      best_mode=evaluators_lib.best_mode(config.best_metric),
      async_save=config.async_checkpoint)
  train_iter = data.make_train_iterator(config, seed=config.seed)
  report = None
  try:
    _stop_if_preempted("building the input pipeline")
    state, shardings, resume_step = _start_or_resume(run, ckpt, train_iter, init_path, say)
    _stop_if_preempted("restoring the state")
    report = reporting.Reporter(workdir, total_steps=config.total_steps,
                                batch_size=config.batch_size, start_step=resume_step or 0,
                                is_main=jax.process_index() == 0,
                                progress_bar=config.progress_bar)
    say.report = report
    for line in warnings:
      report.info(f"Warning: {line}")
    if changes and resume_step is not None:
      report.info(config_history.describe_changes(changes))
    report.write_config(config)
    if jax.process_index() == 0 and len(info.class_names) == num_classes:
      workdir_lib.write_labels(workdir, info.class_names)  # Class names for vit_jax.predict.
    if jax.process_index() == 0:
      config_history.append(workdir, resume_step or 0, config,
                            changes if resume_step is not None else {})
    report.info(f"Workdir {workdir}: {config.model.name} ({run.objective.describe(num_classes)}, "
                f"{config.model.image_size} px) on {info.name}, {jax.device_count()} "
                f"{jax.devices()[0].platform} devices, mesh {dict(run.mesh.shape)}, "
                f"{jax.process_count()} process(es).")
    loop = _Loop(run, workdir, report, ckpt, train_iter, state, shardings, resume_step)
    loop.run()
  finally:
    train_iter.close()
    ckpt.close()
    if report is not None:
      report.close()
  return _finish(run, loop, workdir, report, ckpt, time.perf_counter() - start_time)


def _finish(run, loop, workdir, report, ckpt, wall_time_s) -> dict:
  """Exports the parameters and plots (unless preempted); prints and returns the summary."""
  params_dir, plots = None, []
  if not loop.preempted:
    params_dir = workdir_lib.file(workdir, workdir_lib.PARAMS_DIR)
    exported = loop.state.params
    if run.config.export_ema and loop.state.ema_params is not None:
      exported = loop.state.ema_params
    checkpoints.save_params(params_dir, run.objective.exported_params(exported), force=True)
    if run.config.plots:
      plots = report.plot()
  metrics = loop.eval_metrics or {}
  summary = {
      "step": loop.step, "accuracy": metrics.get("accuracy"),
      "accuracy_top5": metrics.get("accuracy_top5"), "eval_loss": metrics.get("loss"),
      "best_accuracy": loop.best[0], "best_step": loop.best[1],
      "best_metric": loop.best_metric, "wall_time_s": wall_time_s,
      "workdir": workdir, "checkpoint_dir": str(ckpt.directory), "params_dir": params_dir,
      "preempted": loop.preempted, "plots": plots,
  }
  reporting.print_summary(report, summary, run.config.total_steps)
  return summary
