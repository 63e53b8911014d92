"""Ablation grids: every combination of swept config values, trained over several seeds.

`python -m vit_jax.ablate` is the command; this module holds the pieces:

  parse_sweep('model.posemb=learn,none', config)  -> Sweep('model.posemb', (...))
  variants([sweep, ...])                          -> the grid, one dict per variant
  run_grid(config, sweeps, seeds, workdir)        -> trains what is not finished yet
  collect(workdir, sweeps, seeds) / write_report  -> results.csv, results.md, results.png

Each run is a normal trainer run (`training.loop.train_and_evaluate`) in its own
sub-workdir DIR/<field=value,...>/seed_<s>, so it resumes from its checkpoints when
interrupted and is skipped once finished. A run is finished when its workdir holds the
exported final `params/` and `metrics.jsonl` has an eval record at `config.total_steps`;
that record's accuracy is the run's result.
"""

import ast
import copy
import csv
import dataclasses
import itertools
import math
import os
import re
from typing import Any, Callable, Optional, Sequence

from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_jax.training import reporting  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One swept field: its dotted path, the values as typed, and as parsed."""
  field: str
  texts: tuple[str, ...]
  values: tuple[Any, ...]


def _field_node(config, field: str):
  """(parent ConfigDict, leaf name) of a dotted field; ValueError naming a missing one."""
  node, walked = config, "config"
  *parents, leaf = field.split(".")
  for key in parents + [leaf]:
    if not hasattr(node, "keys") or key not in node.keys():
      fields = sorted(node.keys()) if hasattr(node, "keys") else []
      hint = (f" Fields of {walked}: {', '.join(fields)}." if fields
              else f" {walked} is a value, not a group of fields.")
      raise ValueError(f"--sweep={field}=...: the config has no field {walked}.{key}.{hint}")
    if key != leaf:
      node = node[key]
    walked = f"{walked}.{key}"
  return node, leaf


def _literal(text: str):
  """ml_collections' rule for fields of no fixed type: a Python literal, else the string."""
  if text in ("true", "false"):
    text = text.capitalize()
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def parse_value(text: str, field_type):
  """`text` as `--config.FIELD=text` would set a field of `field_type`."""
  if field_type is bool:
    return flags.BooleanParser().parse(text)
  if field_type is int:
    return flags.IntegerParser().parse(text)
  if field_type is float:
    return flags.FloatParser().parse(text)
  if field_type is str:
    return None if text == "None" else text
  value = _literal(text)
  if field_type is tuple and not isinstance(value, tuple):
    value = tuple(value) if isinstance(value, list) else (value,)
  return value


def _split_values(text: str) -> list[str]:
  """'1,2' -> ['1', '2']; commas inside brackets stay: '(1,2),(3,4)' -> two tuples."""
  parts, depth, current = [], 0, ""
  for char in text:
    depth += char in "([{"
    depth -= char in ")]}"
    if char == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += char
  parts.append(current)
  return [p.strip() for p in parts]


def parse_sweep(spec: str, config) -> Sweep:
  """'FIELD=V1,V2,...' -> a Sweep, each value parsed for the field's type in `config`."""
  field, sep, values = spec.partition("=")
  field = field.strip()
  texts = _split_values(values) if sep else []
  if not sep or not field or not texts or any(not t for t in texts):
    raise ValueError(f"--sweep={spec}: expected FIELD=V1,V2,... (e.g. "
                     "--sweep=model.posemb=learn,sincos2d or --sweep=lr=1e-3,3e-3).")
  node, leaf = _field_node(config, field)
  field_type = node.get_type(leaf)
  parsed = []
  for text in texts:
    try:
      parsed.append(parse_value(text, field_type))
    except (flags.Error, ValueError) as e:
      raise ValueError(f"--sweep={spec}: {text!r} is not a valid value for {field} "
                       f"({field_type.__name__}): {e}") from None
  if len(set(texts)) != len(texts):
    raise ValueError(f"--sweep={spec}: a value is repeated.")
  return Sweep(field, tuple(texts), tuple(parsed))


def check_sweeps(sweeps: Sequence[Sweep]) -> None:
  fields = [s.field for s in sweeps]
  if not fields:
    raise ValueError("Give at least one --sweep=FIELD=V1,V2,...")
  repeated = sorted({f for f in fields if fields.count(f) > 1})
  if repeated:
    raise ValueError(f"Field(s) swept twice: {', '.join(repeated)}; list all values in one "
                     "--sweep.")


def variants(sweeps: Sequence[Sweep]) -> list[dict]:
  """The grid: one {field: (text, value)} per combination, the first sweep slowest."""
  grid = itertools.product(*[list(zip(s.texts, s.values)) for s in sweeps])
  return [{s.field: pair for s, pair in zip(sweeps, combo)} for combo in grid]


def variant_name(variant: dict) -> str:
  """'model.posemb=learn,lr=0.001': the variant's sub-workdir name (unsafe chars -> '_')."""
  return _SAFE_NAME.sub("_", ",".join(f"{f}={text}" for f, (text, _) in variant.items()))


def run_dir(workdir: str, variant: dict, seed: int) -> str:
  return os.path.join(workdir, variant_name(variant), f"seed_{seed}")


def variant_config(config, variant: dict, seed: int):
  """A copy of `config` with the variant's values and `seed` set."""
  config = copy.deepcopy(config)  # Keeps FieldReferences linked (pp.crop -> image_size).
  for field, (text, value) in variant.items():
    node, leaf = _field_node(config, field)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"--sweep {field}={text}: {e}") from None
  config.seed = seed
  return config


def final_accuracy(run_workdir: str, total_steps: int) -> Optional[float]:
  """The eval accuracy at `total_steps` of a finished run in `run_workdir`, else None."""
  if not os.path.isdir(workdir_lib.file(run_workdir, workdir_lib.PARAMS_DIR)):
    return None
  evals = [r for r in reporting.read_metrics(run_workdir)
           if r.get("kind") == "eval" and r.get("step") == total_steps and "accuracy" in r]
  return float(evals[-1]["accuracy"]) if evals else None


def run_grid(config, sweeps: Sequence[Sweep], seeds: Sequence[int], workdir: str, *,
             train: Optional[Callable] = None, log: Callable[[str], None] = print) -> int:
  """Trains every (variant, seed) not finished yet; returns how many were trained.

  `train(config, workdir)` defaults to `training.loop.train_and_evaluate`.
  """
  if train is None:
    from vit_jax.training import loop  # pylint: disable=g-import-not-at-top
    train = loop.train_and_evaluate
  check_sweeps(sweeps)
  jobs = [(v, s) for v in variants(sweeps) for s in seeds]
  todo = [(v, s) for v, s in jobs
          if final_accuracy(run_dir(workdir, v, s), int(config.total_steps)) is None]
  log(f"Ablation in {workdir}: {len(jobs)} runs ({len(jobs) // len(seeds)} variants x "
      f"{len(seeds)} seeds), {len(jobs) - len(todo)} finished, {len(todo)} to train.")
  for i, (variant, seed) in enumerate(todo, start=1):
    log(f"[{i}/{len(todo)}] {variant_name(variant)} seed {seed}: training "
        f"({len(todo) - i} remaining after this one)")
    train(variant_config(config, variant, seed), run_dir(workdir, variant, seed))
  return len(todo)


@dataclasses.dataclass
class Row:
  """One variant's results: per-seed accuracies (None for a run not finished)."""
  name: str
  values: dict  # field -> text
  accuracies: dict  # seed -> accuracy or None

  @property
  def finished(self) -> list[float]:
    return [a for a in self.accuracies.values() if a is not None]

  @property
  def mean(self) -> float:
    return float(np.mean(self.finished)) if self.finished else math.nan

  @property
  def std(self) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    done = self.finished
    return float(np.std(done, ddof=1)) if len(done) > 1 else (0.0 if done else math.nan)


def collect(workdir: str, sweeps: Sequence[Sweep], seeds: Sequence[int],
            total_steps: int) -> list[Row]:
  """Each variant's final accuracies, read back from its runs' metrics.jsonl."""
  return [Row(variant_name(v), {f: text for f, (text, _) in v.items()},
              {s: final_accuracy(run_dir(workdir, v, s), total_steps) for s in seeds})
          for v in variants(sweeps)]


def _percent(x: float) -> str:
  return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def write_csv(rows: Sequence[Row], path: str) -> str:
  """One line per run: the variant's fields, seed, final accuracy (empty if unfinished)."""
  fields = list(rows[0].values) if rows else []
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["variant"] + fields + ["seed", "accuracy"])
    for row in rows:
      for seed, accuracy in row.accuracies.items():
        writer.writerow([row.name] + [row.values[k] for k in fields]
                        + [seed, "" if accuracy is None else f"{accuracy:.6f}"])
  return path


def markdown_table(rows: Sequence[Row]) -> str:
  """Mean +- std of the final test accuracy (%) per variant, n finished runs, per seed."""
  fields = list(rows[0].values) if rows else []
  seeds = list(rows[0].accuracies) if rows else []
  head = fields + ["n", "accuracy % (mean +- std)"] + [f"seed {s}" for s in seeds]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [f"`{row.values[k]}`" for k in fields] + [str(len(row.finished))]
    cells.append(f"{_percent(row.mean)} +- {_percent(row.std)}" if row.finished else "-")
    cells += [_percent(row.accuracies[s]) for s in seeds]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_results(rows: Sequence[Row], path: str, title: str = "") -> str:
  """Bar chart of the mean final accuracy per variant, error bars one std, seeds as dots."""
  names = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in r.values.items()) for r in rows]
  means = np.array([100 * r.mean for r in rows])
  stds = np.array([100 * r.std for r in rows])
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 4.2))
  x = np.arange(len(rows))
  ax.bar(x, np.nan_to_num(means), yerr=np.nan_to_num(stds), capsize=4, color="tab:blue",
         alpha=0.75)
  for i, row in enumerate(rows):
    done = row.finished
    ax.scatter(np.full(len(done), i), 100 * np.asarray(done), color="black", s=10, zorder=3)
  finite = [m - s for m, s in zip(means, stds) if not math.isnan(m)]
  low = min(finite) if finite else 0.0
  ax.set_ylim(max(0.0, low - 5.0), 100.0)
  ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
  ax.set_ylabel("final test accuracy (%)")
  ax.set_title(title or "mean +- std over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(workdir: str, sweeps: Sequence[Sweep], seeds: Sequence[int],
                 total_steps: int, title: str = "") -> dict:
  """results.csv, results.md and results.png in `workdir`; returns their paths and rows."""
  rows = collect(workdir, sweeps, seeds, total_steps)
  os.makedirs(workdir, exist_ok=True)
  md_path = os.path.join(workdir, RESULTS_MD)
  with open(md_path, "w", encoding="utf-8") as f:
    if title:
      f.write(f"{title}\n\n")
    f.write(markdown_table(rows))
  return {"rows": rows, "csv": write_csv(rows, os.path.join(workdir, RESULTS_CSV)),
          "md": md_path, "png": plot_results(rows, os.path.join(workdir, RESULTS_PNG), title)}
