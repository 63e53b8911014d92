"""What a person watching a training run sees, and what is left in the workdir for later.

`Reporter` prints a progress line every `log_every` steps (step, loss, lr, images/s, ETA),
writes every metric to `metrics.jsonl` and TensorBoard event files, saves the resolved
config as `config.json` / `config.yaml`, and draws `loss.png` / `accuracy.png` at the end.
Only the first process writes; the others stay silent.

The workdir may be a gs:// bucket (through etils.epath). Objects there cannot be appended
to, so `metrics.jsonl` is then rewritten whole on every record from the records kept in
memory (a few hundred short lines for a whole run), and the TensorBoard event files are
written to a local temporary directory and uploaded to WORKDIR/tensorboard after every
flush and at close (`_EventUploader`).
"""

import datetime
import io
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

from vit_jax import storage
from vit_jax.training import workdir as workdir_lib


def format_duration(seconds: float) -> str:
  """'1:02:03' for 3723 seconds; '?' when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


def _read_records(path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(workdir) -> list[dict]:
  """The records of `metrics.jsonl` in `workdir`, in order ([] if there is none)."""
  return _read_records(workdir_lib.path(workdir, workdir_lib.METRICS_FILE))


def _lines(records) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


class _MetricsLog:
  """metrics.jsonl: appended to on local disk; on object storage, which has no appends,
  rewritten whole from the records kept in memory.

  Records after `last_step` are dropped at the start: a resumed run logs those steps again.
  """

  def __init__(self, path, last_step: int):
    self._path, self._remote = path, storage.is_remote(path)
    records = _read_records(path)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    if len(kept) != len(records):
      path.write_text(_lines(kept))
    self._records = kept if self._remote else None

  def append(self, record: dict) -> None:
    if self._remote:
      self._records.append(record)
      self._path.write_text(_lines(self._records))
    else:
      with self._path.open("a") as f:
        f.write(_lines([record]))


class _EventUploader:
  """TensorBoard events for a remote directory: tensorboardX writes them to a local
  temporary directory; `upload()` copies every file that changed since the last call."""

  def __init__(self, remote_dir):
    self.remote_dir = remote_dir
    self.local_dir = tempfile.mkdtemp(prefix="vit_jax_tensorboard_")
    self._sizes = {}

  def upload(self) -> None:
    for local in sorted(pathlib.Path(self.local_dir).rglob("*")):
      size = local.stat().st_size if local.is_file() else None
      if size is None or self._sizes.get(local) == size:
        continue
      (self.remote_dir / local.relative_to(self.local_dir).as_posix()).write_bytes(
          local.read_bytes())
      self._sizes[local] = size

  def close(self) -> None:
    self.upload()
    shutil.rmtree(self.local_dir, ignore_errors=True)


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

  def __init__(self, workdir, *, total_steps: int, batch_size: int, start_step: int = 0,
               is_main: bool = True, progress_bar: bool = False, stream=None):
    self.workdir = workdir
    self.total_steps, self.batch_size = int(total_steps), int(batch_size)
    self.is_main = is_main
    self._stream = stream or sys.stdout
    self._last = (int(start_step), time.perf_counter())
    self._writer = self._bar = self._uploader = None
    if not is_main:
      return
    if not storage.is_remote(workdir):
      workdir_lib.path(workdir).mkdir(parents=True, exist_ok=True)
    self._metrics = _MetricsLog(workdir_lib.path(workdir, workdir_lib.METRICS_FILE),
                                start_step)
    events_dir = workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR)
    self._uploader = _EventUploader(events_dir) if storage.is_remote(workdir) else None
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # purge_step hides events a preempted run wrote after its last checkpoint.
    self._writer = SummaryWriter(
        self._uploader.local_dir if self._uploader else os.fspath(events_dir),
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
    self._metrics.append(record)
    for k, v in metrics.items():
      self._writer.add_scalar(f"{kind}/{k}", float(v), int(step))
    self._writer.flush()
    if self._uploader is not None:
      self._uploader.upload()

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
      self._writer = None
    if self._uploader is not None:
      self._uploader.close()
      self._uploader = None


def plot_curves(workdir) -> list[str]:
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
      fig.tight_layout()
      png = io.BytesIO()
      fig.savefig(png, format="png", dpi=100)
      workdir_lib.path(workdir, filename).write_bytes(png.getvalue())
      written.append(workdir_lib.file(workdir, filename))
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
