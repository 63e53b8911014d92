"""Evaluations during training: the eval split, and the named entries of `config.evals`.

Every evaluator has a name, its own `every` (steps; 0 = only at the end) and returns a
flat dict of metrics whose keys start with its name; the loop runs the ones due, reports
each under its name (metrics.jsonl, TensorBoard, the progress line) and ranks checkpoints
by `config.best_metric`. With EMA on, each also reports the EMA weights under `ema/`.

  the eval split      accuracy, accuracy_top5, loss, num_examples   (ema/accuracy, ...)
  classification      NAME/accuracy, NAME/accuracy_top5, NAME/loss  (NAME/ema/accuracy)
  fewshot             NAME/5shot (one dataset) or NAME/DATASET/5shot (several), per shot

`config.evals` is a ConfigDict of named ConfigDicts (ml_collections cannot take a list of
dicts from the command line). A config file adds the entries, with
`configs/common.py`'s `classification_eval(...)` / `fewshot_eval(...)` or by hand (fields
left out take `ENTRY_DEFAULTS`), e.g. `c.evals.fewshot = common.fewshot_eval("digits")`;
the command line changes their fields: `--config.evals.fewshot.every=500`.

Few-shot (the paper's Section 4 metric): frozen pre-logits features of the eval-time
preprocessed train and test splits (`objective.exported_params`, i.e. the ViT, with no
head); for each shot count and seed, `shots` examples per class are drawn
(`evaluate.fewshot.sample_shots`) and a closed-form ridge probe fitted for every strength
in `regs` (`evaluate.fewshot.fit_linear_probe`). The strength is chosen by the mean
accuracy, over seeds, on the train examples not drawn as shots, and the mean test accuracy
at that strength is reported (with a single strength there is nothing to choose).
"""

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import data
from vit_jax import models
from vit_jax.data.errors import DataError
from vit_jax.data.images import normalize_images
from vit_jax.evaluate import fewshot
from vit_jax.parallel.mesh import batch_sharding, replicated

KINDS = ("classification", "fewshot")
EMA_PREFIX = "ema/"
MAIN_METRICS = ("accuracy", "accuracy_top5", "loss")

# The fields of an entry that were not given, per kind.
ENTRY_DEFAULTS = {
    "classification": dict(every=1000, dataset=None, split="test", data_dir=None),
    "fewshot": dict(every=1000, datasets=None, shots=(1, 5, 10, 25),
                    regs=(2.0**-10, 2.0**-5, 1.0, 2.0**5, 2.0**10), seeds=(0, 1, 2),
                    train_split="train", test_split="test", data_dir=None),
}
_REQUIRED = {"classification": "dataset", "fewshot": "datasets"}


def _entry(config, name) -> dict:
  """The entry `name` of config.evals with its kind's defaults filled in."""
  raw = config.evals[name]
  raw = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
  kind = raw.get("kind")
  if kind not in KINDS:
    raise ValueError(f"config.evals.{name}.kind={kind!r}: choose one of {KINDS}.")
  unknown = sorted(set(raw) - set(ENTRY_DEFAULTS[kind]) - {"kind"})
  if unknown:
    raise ValueError(f"config.evals.{name} has unknown field(s) {unknown} for kind "
                     f"{kind!r}; valid: {sorted(ENTRY_DEFAULTS[kind])}.")
  entry = {**ENTRY_DEFAULTS[kind], **raw}
  if not entry[_REQUIRED[kind]]:
    raise ValueError(f"config.evals.{name}.{_REQUIRED[kind]} is not set.")
  return entry


def _dataset_names(entry) -> list[str]:
  value = entry["datasets"]
  names = value.split(",") if isinstance(value, str) else list(value)
  return [n.strip() for n in names if n.strip()]


def _short_name(dataset: str) -> str:
  return os.path.basename(dataset.rstrip(os.sep)) or dataset


def _fewshot_key(name, prefix, datasets, dataset, shots) -> str:
  middle = f"{_short_name(dataset)}/" if len(datasets) > 1 else ""
  return f"{name}/{prefix}{middle}{int(shots)}shot"


def metric_names(config) -> list[str]:
  """Every metric name an evaluation of `config` reports (for `config.best_metric`)."""
  prefixes = ["", EMA_PREFIX] if float(config.ema_decay) > 0 else [""]
  names = [p + m for p in prefixes for m in MAIN_METRICS]
  for name in sorted(config.evals):
    entry = _entry(config, name)
    for p in prefixes:
      if entry["kind"] == "classification":
        names += [f"{name}/{p}{m}" for m in MAIN_METRICS]
      else:
        datasets = _dataset_names(entry)
        names += [_fewshot_key(name, p, datasets, d, k) for d in datasets
                  for k in entry["shots"]]
  return names


def best_mode(metric: str) -> str:
  """'min' for losses, 'max' for accuracies."""
  return "min" if metric.split("/")[-1] == "loss" else "max"


def _resolve(config):
  """The dataset `config` reads (tensorflow-datasets is imported only here)."""
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.resolve(config)


def _config_for(config, dataset, data_dir):
  """The run's config reading another dataset (same preprocessing and batch sizes)."""
  other = config.copy_and_resolve_references()
  other.dataset = dataset
  if data_dir:
    other.data_dir = data_dir
  return other


def _entry_problems(config, name) -> list[str]:
  try:
    entry = _entry(config, name)
  except ValueError as e:
    return [str(e)]
  lines = []
  if int(entry["every"]) < 0:
    lines.append(f"config.evals.{name}.every={entry['every']} must be >= 0 (0 = only at "
                 "the end).")
  if entry["kind"] == "classification":
    checks = [(entry["dataset"], (entry["split"],))]
  else:
    checks = [(d, (entry["train_split"], entry["test_split"])) for d in _dataset_names(entry)]
    if not entry["shots"] or any(int(k) < 1 for k in entry["shots"]):
      lines.append(f"config.evals.{name}.shots={entry['shots']} must be positive counts, "
                   "e.g. (1, 5, 10, 25).")
    if not entry["regs"] or any(float(r) <= 0 for r in entry["regs"]):
      lines.append(f"config.evals.{name}.regs={entry['regs']} must be positive ridge "
                   "strengths.")
    if not entry["seeds"]:
      lines.append(f"config.evals.{name}.seeds must name at least one seed.")
  for dataset, splits in checks:
    other = _config_for(config, dataset, entry["data_dir"])
    try:
      ds = _resolve(other)
      for split in splits:
        ds.num_examples(split)
      if entry["kind"] == "classification":
        want = config.num_classes or len(_resolve(config).class_names)
        if len(ds.class_names) != want:
          lines.append(f"config.evals.{name}: dataset {dataset!r} has "
                       f"{len(ds.class_names)} classes but the model's head has {want}; a "
                       "classification evaluation needs the training label set (use kind "
                       "'fewshot' for other datasets).")
    except (DataError, ValueError) as e:
      lines.append(f"config.evals.{name}: dataset {dataset!r}: {e}")
  return lines


def problems(config) -> list[str]:
  """What in config.evals / config.best_metric cannot run, one line each ([] if fine).

  Reads the datasets' metadata (a missing or unprepared dataset is named here, before
  training), not their images.
  """
  lines = []
  for name in sorted(config.evals):
    if "/" in name:
      lines.append(f"config.evals.{name}: names may not contain '/'.")
      continue
    lines += _entry_problems(config, name)
  if not lines:
    known = metric_names(config)
    if config.best_metric not in known:
      lines.append(f"config.best_metric={config.best_metric!r} is not reported by any "
                   f"evaluation; choose one of {known}.")
  return lines


def _param_sets(state) -> dict:
  """{'': params} and, with EMA on, {'ema/': ema_params}."""
  sets = {"": state.params}
  if state.ema_params is not None:
    sets[EMA_PREFIX] = state.ema_params
  return sets


@dataclasses.dataclass
class Evaluator:
  """One named evaluation: `run(state) -> {metric: float}` every `every` steps."""
  name: str
  every: int
  label: str  # What the progress line calls it (the split, or the entry's name).
  run_fn: Callable

  def due(self, step: int, last: bool) -> bool:
    return last or (self.every > 0 and step % self.every == 0)

  def run(self, state) -> dict:
    return self.run_fn(state)


def _sums_over(iterator, prefetch, eval_step, params) -> dict:
  totals = None
  try:
    for batch in prefetch(iterator):
      sums = eval_step(params, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  finally:
    iterator.close()
  return {k: float(v) for k, v in jax.device_get(totals).items()}


def split_metrics(config, split, prefetch, eval_step, params) -> dict:
  """Top-1 / top-5 accuracy and mean loss over a whole split (padding masked)."""
  totals = _sums_over(data.make_eval_iterator(config, split=split), prefetch, eval_step,
                      params)
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count,
          "accuracy_top5": totals["correct_top5"] / count,
          "loss": totals["loss_sum"] / count,
          "num_examples": int(totals["count"])}


def _classification(name, every, config, split, prefetch, eval_step, prefix_keys) -> Evaluator:
  def run(state):
    out = {}
    for prefix, params in _param_sets(state).items():
      metrics = split_metrics(config, split, prefetch, eval_step, params)
      if prefix:
        metrics.pop("num_examples")
      key_prefix = f"{name}/{prefix}" if prefix_keys else prefix
      out.update({key_prefix + k: v for k, v in metrics.items()})
    return out
  return Evaluator(name, int(every), split if not prefix_keys else name, run)


def make_features_fn(objective, config, mesh, state_shardings):
  """Jitted `(params, batch) -> (features [b, dim], labels [b], mask [b])`, replicated.

  The features are the ViT's pre-logits (`objective.exported_params`, no head).
  """
  body = models.from_config(config.model, None)

  def features(params, batch):
    vit_params = objective.exported_params(params)
    feats = body.apply({"params": vit_params}, normalize_images(batch["image"]), train=False)
    return feats.astype(jnp.float32), batch["label"], batch["mask"]

  return jax.jit(features, in_shardings=(state_shardings.params, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))


def split_features(config, split, prefetch, features_fn, params):
  """(features [n, dim] float64, labels [n]) of every example of `split` (no padding)."""
  feats, labels = [], []
  iterator = data.make_eval_iterator(config, split=split)
  try:
    for batch in prefetch(iterator):
      f, l, m = jax.device_get(features_fn(params, batch))
      keep = np.asarray(m, bool)
      feats.append(np.asarray(f, np.float64)[keep])
      labels.append(np.asarray(l)[keep])
  finally:
    iterator.close()
  return np.concatenate(feats), np.concatenate(labels)


def fewshot_results(train, test, num_classes, shots, regs, seeds) -> dict:
  """{shots: mean test accuracy over seeds at the ridge strength chosen on held-out train}.

  train, test: (features [n, dim], labels [n]). For each shot count and seed the probe is
  fitted on `sample_shots(train labels, shots, seed)`; the other train examples are the
  validation set that picks the strength (mean over seeds; the first of equals). A
  class with fewer than `shots` train examples leaves that shot count out.
  """
  (x_train, y_train), (x_test, y_test) = train, test
  results = {}
  for k in shots:
    try:
      draws = [fewshot.sample_shots(y_train, int(k), seed=int(s)) for s in seeds]
    except ValueError:
      continue
    val_acc = np.zeros((len(regs), len(seeds)))
    test_acc = np.zeros((len(regs), len(seeds)))
    for j, index in enumerate(draws):
      held_out = np.setdiff1d(np.arange(len(y_train)), index)
      for i, reg in enumerate(regs):
        probe = fewshot.fit_linear_probe(x_train[index], y_train[index], num_classes,
                                         float(reg))
        test_acc[i, j] = np.mean(probe.predict(x_test) == y_test)
        if len(regs) > 1 and len(held_out):
          val_acc[i, j] = np.mean(probe.predict(x_train[held_out]) == y_train[held_out])
    best = int(np.argmax(val_acc.mean(axis=1)))
    results[int(k)] = float(test_acc[best].mean())
  return results


def _fewshot(name, entry, config, prefetch, features_fn, report) -> Evaluator:
  datasets = _dataset_names(entry)
  configs = {d: _config_for(config, d, entry["data_dir"]) for d in datasets}
  warned = set()

  def run(state):
    out = {}
    for prefix, params in _param_sets(state).items():
      for dataset, ds_config in configs.items():
        num_classes = len(_resolve(ds_config).class_names)
        train = split_features(ds_config, entry["train_split"], prefetch, features_fn, params)
        test = split_features(ds_config, entry["test_split"], prefetch, features_fn, params)
        results = fewshot_results(train, test, num_classes, entry["shots"], entry["regs"],
                                  entry["seeds"])
        for k in entry["shots"]:
          if int(k) in results:
            out[_fewshot_key(name, prefix, datasets, dataset, k)] = results[int(k)]
          elif (dataset, k) not in warned:
            warned.add((dataset, k))
            report.info(f"config.evals.{name}: {dataset} {entry['train_split']} has a class "
                        f"with fewer than {k} examples; its {k}-shot result is left out.")
    return out

  return Evaluator(name, int(entry["every"]), name, run)


def make_evaluators(run, eval_step, state_shardings, report) -> list[Evaluator]:
  """The eval split (every config.eval_every) and one Evaluator per config.evals entry.

  run: the loop's `_Run` (config, mesh, objective, prefetch).
  """
  config = run.config
  evaluators = [_classification("", config.eval_every, config, config.eval_split,
                                run.prefetch, eval_step, prefix_keys=False)]
  features_fn = None
  for name in sorted(config.evals):
    entry = _entry(config, name)
    if entry["kind"] == "classification":
      other = _config_for(config, entry["dataset"], entry["data_dir"])
      evaluators.append(_classification(name, entry["every"], other, entry["split"],
                                        run.prefetch, eval_step, prefix_keys=True))
    else:
      if features_fn is None:
        features_fn = make_features_fn(run.objective, config, run.mesh, state_shardings)
      evaluators.append(_fewshot(name, entry, config, run.prefetch, features_fn, report))
  return evaluators
