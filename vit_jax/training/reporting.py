"""What a person watching a training run sees, and what is left in the workdir for later.

`Reporter` prints a progress line every `log_every` steps (step, loss, lr, images/s, ETA),
writes every metric to `metrics.jsonl` and TensorBoard event files, saves the resolved
config as `config.json` / `config.yaml`, and draws `loss.png` / `accuracy.png` at the end.
Only the first process writes; the others stay silent.
"""

import datetime
import json
import math
import os
import sys
import time

from vit_jax.training import workdir as workdir_lib


def format_duration(seconds: float) -> str:
  """'1:02:03' for 3723 seconds; '?' when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl` in `workdir`, in order ([] if there is none)."""
  path = workdir_lib.file(workdir, workdir_lib.METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops records after `last_step`: a resumed run logs those steps again."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
  if len(kept) != len(lines):
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(kept)


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) \
        else f"{value:.4f}"
  return str(value)


class Reporter:
  """Progress lines, metrics.jsonl, TensorBoard and plots for one run in `workdir`.

  Args:
    workdir: where the files go (created if needed).
    total_steps: the step the run ends at (for the ETA).
    batch_size: global images per step (for images/s).
    start_step: the step the run starts or resumes from; later records are dropped.
    is_main: False on every process but the first: nothing is printed or written.
    progress_bar: a tqdm bar instead of plain lines.
    stream: where progress goes (default stdout).
  """

  def __init__(self, workdir: str, *, total_steps: int, batch_size: int, start_step: int = 0,
               is_main: bool = True, progress_bar: bool = False, stream=None):
    self.workdir = workdir
    self.total_steps, self.batch_size = int(total_steps), int(batch_size)
    self.is_main = is_main
    self._stream = stream or sys.stdout
    self._last = (int(start_step), time.perf_counter())
    self._writer = self._bar = None
    if not is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    self._metrics_path = workdir_lib.file(workdir, workdir_lib.METRICS_FILE)
    _truncate_metrics(self._metrics_path, start_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # purge_step hides events a preempted run wrote after its last checkpoint.
    self._writer = SummaryWriter(workdir_lib.file(workdir, workdir_lib.TENSORBOARD_DIR),
                                 purge_step=start_step + 1 if start_step else None)
    if progress_bar:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=self.total_steps, initial=start_step, unit="step",
                            file=self._stream, dynamic_ncols=True)

  def info(self, text: str) -> None:
    """Prints a line (through the progress bar when there is one)."""
    if not self.is_main:
      return
    if self._bar is not None:
      self._bar.write(text, file=self._stream)
    else:
      print(text, file=self._stream, flush=True)

  def write_config(self, config) -> None:
    """Saves the resolved config as config.json and config.yaml."""
    if not self.is_main:
      return
    workdir_lib.write_config(self.workdir, config)

  def _record(self, kind: str, step: int, metrics: dict) -> None:
    record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
    record.update({k: float(v) for k, v in metrics.items()})
    with open(self._metrics_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self._writer.add_scalar(f"{kind}/{k}", float(v), int(step))
    self._writer.flush()

  def train(self, step: int, metrics: dict) -> dict:
    """Reports training metrics (averaged since the last call) at `step`.

    Adds 'images_per_sec' (since the last call) and returns the metrics with it.
    """
    now = time.perf_counter()
    last_step, last_time = self._last
    self._last = (step, now)
    steps_per_sec = (step - last_step) / max(now - last_time, 1e-9)
    metrics = dict(metrics, images_per_sec=steps_per_sec * self.batch_size)
    if not self.is_main:
      return metrics
    self._record("train", step, metrics)
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                            img_s=f"{metrics['images_per_sec']:.0f}")
    else:
      width = len(str(self.total_steps))
      self.info(f"step {step:>{width}}/{self.total_steps} | loss {metrics['loss']:.4f} | "
                f"lr {metrics['learning_rate']:.3e} | {metrics['images_per_sec']:.0f} img/s | "
                f"ETA {format_duration(eta)}")
    return metrics

  def pause_clock(self, step: int) -> None:
    """Restarts the images/s clock (call after an evaluation or a checkpoint wait)."""
    self._last = (step, time.perf_counter())

  def eval(self, step: int, metrics: dict, split: str = "test") -> None:
    """Reports evaluation metrics (accuracy, accuracy_top5, loss, ...) at `step`."""
    if not self.is_main:
      return
    self._record("eval", step, metrics)
    parts = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
    self.info(f"eval {split} @ step {step}: {parts}")

  def plot(self) -> list[str]:
    """Draws loss.png and accuracy.png from metrics.jsonl; returns the paths written."""
    if not self.is_main:
      return []
    return plot_curves(self.workdir)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()


def plot_curves(workdir: str) -> list[str]:
  """loss.png (train and eval loss) and accuracy.png (eval top-1/top-5) from metrics.jsonl."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_metrics(workdir)
  curves = {
      workdir_lib.LOSS_PLOT: ("loss", [("train", "loss", "train loss"), ("eval", "loss", "eval loss")]),
      workdir_lib.ACCURACY_PLOT: ("accuracy", [("eval", "accuracy", "top-1"),
                                    ("eval", "accuracy_top5", "top-5")]),
  }
  written = []
  for filename, (ylabel, series) in curves.items():
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for kind, key, label in series:
      points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
      if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if kind == "eval" else None, label=label)
        drawn = True
    if drawn:
      ax.set_xlabel("step")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
      ax.legend()
      path = workdir_lib.file(workdir, filename)
      fig.tight_layout()
      fig.savefig(path, dpi=100)
      written.append(path)
    plt.close(fig)
  return written


def print_summary(report, summary: dict, total: int) -> None:
  """The closing lines of a run (finished or preempted) from its summary dict."""
  if summary["preempted"]:
    report.info(f"Stopped at step {summary['step']}/{total} after "
                f"{format_duration(summary['wall_time_s'])}; checkpoint in "
                f"{summary['checkpoint_dir']}. Rerun the same command to resume.")
    return
  lines = [f"Done: {summary['step']} steps in {format_duration(summary['wall_time_s'])}."]
  if summary["accuracy"] is not None:
    best = ("" if summary["best_accuracy"] is None else
            f"; best {summary['best_metric']} {summary['best_accuracy']:.4f} at step "
            f"{summary['best_step']}")
    lines.append(f"  final accuracy {summary['accuracy']:.4f} (top-5 "
                 f"{summary['accuracy_top5']:.4f}, loss {summary['eval_loss']:.4f}){best}")
  lines.append(f"  checkpoints: {summary['checkpoint_dir']}")
  lines.append(f"  final parameters: {summary['params_dir']} "
               "(use as --config.init_from to fine-tune)")
  workdir = summary["workdir"]
  lines.append(f"  metrics: {workdir_lib.file(workdir, workdir_lib.METRICS_FILE)}, "
               f"TensorBoard: {workdir_lib.file(workdir, workdir_lib.TENSORBOARD_DIR)}")
  if summary["plots"]:
    lines.append(f"  plots: {', '.join(summary['plots'])}")
  report.info("\n".join(lines))
